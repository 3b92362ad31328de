package bridge

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"net/http"
	"strings"

	"github.com/mtor-swarm/mtor/bridge/internal/sameorigin"
)

// keySet holds the API keys as SHA-256 digests, compared in constant time
// against every key so that neither the match nor its position leaks.
type keySet struct {
	digests [][sha256.Size]byte
}

func newKeySet(keys []string) *keySet {
	ks := &keySet{}
	for _, k := range keys {
		ks.digests = append(ks.digests, sha256.Sum256([]byte(k)))
	}
	return ks
}

func (ks *keySet) enabled() bool { return len(ks.digests) > 0 }

func (ks *keySet) valid(key string) bool {
	d := sha256.Sum256([]byte(key))
	ok := 0
	for i := range ks.digests {
		ok |= subtle.ConstantTimeCompare(d[:], ks.digests[i][:])
	}
	return ok == 1
}

// name is a short, stable name for key (a digest prefix): the queue's
// client name, which must not hold the key itself.
func (ks *keySet) name(key string) string {
	d := sha256.Sum256([]byte(key))
	return hex.EncodeToString(d[:8])
}

// bearer is the key of an "Authorization: Bearer <key>" header, or "".
func bearer(r *http.Request) string {
	h := r.Header.Get("Authorization")
	scheme, key, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(key)
}

// check is nil when keys are off or r carries a valid key (as a Bearer
// token, or as one of extra, e.g. the ?key= of a WebSocket URL).
func (ks *keySet) check(r *http.Request, extra ...string) *apiError {
	if !ks.enabled() {
		return nil
	}
	given := false
	for _, k := range append([]string{bearer(r)}, extra...) {
		if k == "" {
			continue
		}
		given = true
		if ks.valid(k) {
			return nil
		}
	}
	if !given {
		return &apiError{Status: http.StatusUnauthorized, Type: typeInvalidRequest, Code: "invalid_api_key",
			Message: "You didn't provide an API key. Send it in an Authorization header: 'Authorization: Bearer <key>'."}
	}
	return &apiError{Status: http.StatusUnauthorized, Type: typeInvalidRequest, Code: "invalid_api_key",
		Message: "Incorrect API key provided."}
}

// wrap requires a valid key on every request but CORS preflights, which
// browsers send without credentials.
func (ks *keySet) wrap(next http.Handler, fail errorWriter) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := ks.check(r); err != nil {
			fail(w, err)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// corsPolicy is the CORS allow-list. Same-origin requests are always
// allowed; a browser request from any other origin not on the list gets 403,
// so that a foreign page cannot even trigger a query.
type corsPolicy struct {
	any     bool
	origins map[string]bool
	// trustForwardedHost also takes X-Forwarded-Host as the request's host
	// (WithTrustForwardedHost).
	trustForwardedHost bool
}

func newCORSPolicy(origins []string, trustForwardedHost bool) *corsPolicy {
	p := &corsPolicy{origins: map[string]bool{}, trustForwardedHost: trustForwardedHost}
	for _, o := range origins {
		if o == "*" {
			p.any = true
			continue
		}
		p.origins[normalizeOrigin(o)] = true
	}
	return p
}

func normalizeOrigin(o string) string {
	return strings.TrimSuffix(strings.ToLower(strings.TrimSpace(o)), "/")
}

// sameOrigin reports whether origin names the host the request came to.
func (p *corsPolicy) sameOrigin(origin string, r *http.Request) bool {
	return sameorigin.Match(origin, r, p.trustForwardedHost)
}

func (p *corsPolicy) allowed(origin string) bool {
	return p.any || p.origins[normalizeOrigin(origin)]
}

// Headers a browser script may read from a cross-origin response.
const exposedHeaders = "X-Mtor-Peer, Retry-After, Retry-After-Ms"

func (p *corsPolicy) wrap(next http.Handler, fail errorWriter) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		origin := r.Header.Get("Origin")
		h := w.Header()
		h.Add("Vary", "Origin")
		preflight := r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != ""
		if origin == "" || (p.sameOrigin(origin, r) && !preflight) {
			next.ServeHTTP(w, r)
			return
		}
		if !p.allowed(origin) && !p.sameOrigin(origin, r) {
			fail(w, &apiError{Status: http.StatusForbidden, Type: typeInvalidRequest, Code: "origin_not_allowed",
				Message: "Origin " + origin + " is not allowed by this bridge's CORS policy."})
			return
		}
		h.Set("Access-Control-Allow-Origin", origin)
		h.Set("Access-Control-Expose-Headers", exposedHeaders)
		if preflight {
			h.Add("Vary", "Access-Control-Request-Method")
			h.Add("Vary", "Access-Control-Request-Headers")
			h.Set("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
			if rh := r.Header.Get("Access-Control-Request-Headers"); rh != "" && validHeaderList(rh) {
				h.Set("Access-Control-Allow-Headers", rh)
			}
			h.Set("Access-Control-Max-Age", "600")
			w.WriteHeader(http.StatusNoContent)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// validHeaderList accepts a comma-separated list of header names before it
// is echoed back.
func validHeaderList(s string) bool {
	if len(s) > 2048 {
		return false
	}
	for _, c := range s {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == ',', c == ' ':
		default:
			return false
		}
	}
	return true
}
