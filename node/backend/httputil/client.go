package httputil

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
)

// BaseURL parses a backend's base URL: http or https, a host, an optional
// path, and no query or fragment, since the backends append API paths to
// it. The path loses its trailing slashes, so u.String()+"/api/x" is the
// endpoint's URL.
func BaseURL(raw string) (*url.URL, error) {
	u, err := url.Parse(strings.TrimSpace(raw))
	if err != nil {
		return nil, fmt.Errorf("base URL %q: %w", raw, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("base URL %q: want http(s)://host:port", raw)
	}
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		return nil, fmt.Errorf("base URL %q: no query or fragment allowed", raw)
	}
	u.Path = strings.TrimRight(u.Path, "/")
	u.RawPath = ""
	return u, nil
}

// NoRedirects returns a copy of c (a client on http.DefaultTransport when c
// is nil) that never follows a redirect, which could send the prompt
// anywhere; the caller's client is left as it was.
func NoRedirects(c *http.Client) *http.Client {
	cc := http.Client{Transport: http.DefaultTransport}
	if c != nil {
		cc = *c
	}
	cc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &cc
}

// MaxIdleConnsPerHost is how many idle keep-alive connections a backend
// keeps to its server: enough for every query a worker runs at once, so
// that a worker under load reuses connections instead of opening one per
// query (http.DefaultTransport keeps 2).
const MaxIdleConnsPerHost = 256

// NewTransport is the transport of a backend's default client: Go's
// default (proxy from the environment, dial and TLS timeouts, HTTP/2)
// with an idle pool of MaxIdleConnsPerHost.
func NewTransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConns = 0 // no bound across hosts: each host has its own
	t.MaxIdleConnsPerHost = MaxIdleConnsPerHost
	return t
}
