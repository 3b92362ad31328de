// Package sameorigin decides whether a browser request comes from the
// bridge's own page. The HTTP API (package bridge) and the WebSocket
// (package bridge/ws) ask the same question, so they share the answer.
package sameorigin

import (
	"net/http"
	"net/url"
	"strings"
)

// Match reports whether origin (an Origin header: scheme://host[:port])
// names the host r was sent to: r.Host, or, when trustForwardedHost is
// set, the host of r's X-Forwarded-Host, which a reverse proxy that
// rewrites Host sets to the host the browser used.
//
// Trusting the header is safe only behind a proxy that sets it, but even
// without one a foreign page gains nothing: a browser cannot put headers on
// a WebSocket handshake, and a fetch with one is preflighted, and the
// preflight carries no X-Forwarded-Host of the page's choosing.
func Match(origin string, r *http.Request, trustForwardedHost bool) bool {
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return false
	}
	if strings.EqualFold(u.Host, r.Host) {
		return true
	}
	if !trustForwardedHost {
		return false
	}
	fh := ForwardedHost(r)
	return fh != "" && strings.EqualFold(u.Host, fh)
}

// ForwardedHost is the host the client asked for as r's X-Forwarded-Host
// names it, or "": the first entry of the header, since proxies that
// append put the client's host first.
func ForwardedHost(r *http.Request) string {
	first, _, _ := strings.Cut(r.Header.Get("X-Forwarded-Host"), ",")
	return strings.TrimSpace(first)
}
