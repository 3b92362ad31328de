// Package webui serves the bridge's web page: plain HTML, CSS and
// JavaScript embedded in the binary, no build step and nothing loaded from
// elsewhere. The page talks to /ws (streaming answers) and polls /api/swarm
// (the peer table).
package webui

import (
	"embed"
	"io/fs"
	"net/http"
)

//go:embed static
var static embed.FS

// csp keeps the page to its own files: scripts and styles only from this
// origin, media only as data: URLs, connections only back to the bridge.
// Were a model's answer ever to reach the DOM as HTML, its inline handlers
// would still not run.
const csp = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; " +
	"media-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Handler serves the embedded files; "/" is the page.
func Handler() http.Handler {
	sub, err := fs.Sub(static, "static")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	files := http.FileServerFS(sub)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		h := w.Header()
		h.Set("Content-Security-Policy", csp)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Frame-Options", "DENY")
		// Small files that change with the binary: always revalidate.
		h.Set("Cache-Control", "no-cache")
		files.ServeHTTP(w, r)
	})
}
