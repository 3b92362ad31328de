package enginetest_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/enginetest"
)

// TestEngineServesBothAPIs starts the real engine and checks that both
// model lists name its model and that a real completion comes back.
func TestEngineServesBothAPIs(t *testing.T) {
	e := enginetest.Start(t, enginetest.WithModelName("tiny-test"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	for _, c := range []struct{ path, want string }{
		{"/v1/models", `"id":"tiny-test"`},
		{"/api/tags", `"name":"tiny-test"`},
	} {
		body := get(t, ctx, e.URL()+c.path)
		if !strings.Contains(body, c.want) {
			t.Errorf("GET %s = %s, want it to contain %s", c.path, body, c.want)
		}
	}

	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, e.URL()+"/v1/chat/completions",
		strings.NewReader(`{"model":"tiny-test","messages":[{"role":"user","content":"hello"}],"max_tokens":8}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Choices []struct {
			Message struct{ Content string }
		}
		Usage struct {
			CompletionTokens int `json:"completion_tokens"`
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	if len(out.Choices) != 1 || out.Choices[0].Message.Content == "" || out.Usage.CompletionTokens != 8 {
		t.Fatalf("completion = %+v, want 8 tokens of text", out)
	}
	s, err := e.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s.Completed != 1 || s.Tokens != 8 {
		t.Errorf("stats = %+v, want 1 completed generation of 8 tokens", s)
	}
}

// TestEngineKill checks that Kill leaves nothing listening.
func TestEngineKill(t *testing.T) {
	e := enginetest.Start(t)
	e.Kill()
	_, err := http.Get(e.URL() + "/v1/models")
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("after Kill: err = %v, want connection refused", err)
	}
}

func get(t *testing.T, ctx context.Context, url string) string {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var sb strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return sb.String()
}
