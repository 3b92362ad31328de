package webui_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/bridge/webui"
)

func TestHandlerServesEmbeddedFiles(t *testing.T) {
	hs := httptest.NewServer(webui.Handler())
	defer hs.Close()
	tests := []struct {
		method, path string
		status       int
		ctype        string
		body         string
	}{
		{"GET", "/", 200, "text/html", `<script src="app.js"`},
		{"GET", "/app.js", 200, "javascript", "use strict"},
		{"GET", "/style.css", 200, "text/css", ":root"},
		{"GET", "/favicon.svg", 200, "image/svg+xml", "<svg"},
		{"HEAD", "/", 200, "text/html", ""},
		{"GET", "/nope.txt", 404, "", ""},
		{"POST", "/", 405, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			req, _ := http.NewRequest(tt.method, hs.URL+tt.path, nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tt.status)
			}
			if !strings.Contains(resp.Header.Get("Content-Type"), tt.ctype) {
				t.Errorf("Content-Type %q, want %q", resp.Header.Get("Content-Type"), tt.ctype)
			}
			if !strings.Contains(string(b), tt.body) {
				t.Errorf("body does not contain %q", tt.body)
			}
			if tt.status == 200 {
				csp := resp.Header.Get("Content-Security-Policy")
				if !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe-inline") {
					t.Errorf("CSP %q", csp)
				}
				if resp.Header.Get("X-Content-Type-Options") != "nosniff" {
					t.Errorf("no nosniff header")
				}
			}
		})
	}
}

// The page must never parse data as HTML and never load anything from
// elsewhere.
func TestPageSourceRules(t *testing.T) {
	hs := httptest.NewServer(webui.Handler())
	defer hs.Close()
	get := func(p string) string {
		resp, err := http.Get(hs.URL + p)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	js := get("/app.js")
	for _, bad := range []string{"innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "setAttribute(\"on"} {
		if strings.Contains(js, bad) {
			t.Errorf("app.js uses %s", bad)
		}
	}
	external := regexp.MustCompile(`(?i)(src|href)\s*=\s*["']?(https?:)?//`)
	for _, p := range []string{"/", "/style.css", "/app.js"} {
		if m := external.FindString(get(p)); m != "" {
			t.Errorf("%s refers to another site: %q", p, m)
		}
	}
}
