package pathbench_test

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/cmd/mtor/internal/pathbench"
)

// TestBackendStreamsTheTokensAsked: the backend streams max_tokens tokens
// (DefaultTokens without it, at most MaxTokens) and reports them in its
// usage chunk, and the load generator asks for and checks that count.
func TestBackendStreamsTheTokensAsked(t *testing.T) {
	be, err := pathbench.StartBackend()
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	cases := []struct {
		name      string
		maxTokens string // in the request; "" for none
		want      int
	}{
		{"default", "", pathbench.DefaultTokens},
		{"one", "1", 1},
		{"long", "300", 300},
		{"over the cap", "5000", pathbench.MaxTokens},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			body := `{"model":"` + pathbench.Model + `","stream":true,"messages":[{"role":"user","content":"hi"}]`
			if tc.maxTokens != "" {
				body += `,"max_tokens":` + tc.maxTokens
			}
			resp, err := http.Post(be.URL()+"/v1/chat/completions", "application/json", strings.NewReader(body+"}"))
			if err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			if n := strings.Count(string(b), pathbench.Token); n != tc.want {
				t.Errorf("%d tokens, want %d", n, tc.want)
			}
			if usage := `"completion_tokens":` + strconv.Itoa(tc.want) + `,`; !strings.Contains(string(b), usage) {
				t.Errorf("no %s in the answer's usage", usage)
			}
			if !strings.HasSuffix(string(b), "data: [DONE]\n\n") {
				t.Errorf("answer does not end with [DONE]: %q", b[max(0, len(b)-40):])
			}

			n := tc.want
			cl := pathbench.NewClient(be.URL(), pathbench.Model, 2, pathbench.WithTokens(n))
			defer cl.Close()
			r := cl.Run(context.Background(), 4, 2)
			if r.Errors != 0 || r.Tokens != n {
				t.Errorf("client of %d tokens: %d errors (%s), answers of %d", n, r.Errors, r.FirstError, r.Tokens)
			}
		})
	}
	t.Run("not JSON", func(t *testing.T) {
		resp, err := http.Post(be.URL()+"/v1/chat/completions", "application/json", strings.NewReader("{"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("status %d, want 400", resp.StatusCode)
		}
	})
}
