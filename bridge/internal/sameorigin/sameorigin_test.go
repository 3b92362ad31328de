package sameorigin_test

import (
	"net/http/httptest"
	"testing"

	"github.com/mtor-swarm/mtor/bridge/internal/sameorigin"
)

func TestMatch(t *testing.T) {
	tests := []struct {
		name      string
		origin    string
		host      string
		forwarded string // X-Forwarded-Host, "" for none
		trust     bool
		want      bool
	}{
		{"same host", "http://127.0.0.1:8080", "127.0.0.1:8080", "", false, true},
		{"same host, case", "http://Bridge.Example", "bridge.example", "", false, true},
		{"other port", "http://127.0.0.1:9090", "127.0.0.1:8080", "", false, false},
		{"other host", "https://evil.example", "bridge.example", "", false, false},
		{"null origin", "null", "bridge.example", "", true, false},
		{"empty origin", "", "bridge.example", "", true, false},
		{"forwarded, untrusted", "https://app.example", "127.0.0.1:8080", "app.example", false, false},
		{"forwarded, trusted", "https://app.example", "127.0.0.1:8080", "app.example", true, true},
		{"forwarded with port, trusted", "https://app.example:8443", "127.0.0.1:8080", "App.Example:8443", true, true},
		{"forwarded list, first wins", "https://app.example", "127.0.0.1:8080", " app.example , proxy.internal", true, true},
		{"forwarded list, later entry", "https://proxy.internal", "127.0.0.1:8080", "app.example, proxy.internal", true, false},
		{"forwarded other host, trusted", "https://evil.example", "127.0.0.1:8080", "app.example", true, false},
		{"no forwarded header, trusted", "https://app.example", "127.0.0.1:8080", "", true, false},
		{"host still matches when trusted", "http://127.0.0.1:8080", "127.0.0.1:8080", "app.example", true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "http://"+tt.host+"/ws", nil)
			if tt.forwarded != "" {
				r.Header.Set("X-Forwarded-Host", tt.forwarded)
			}
			if got := sameorigin.Match(tt.origin, r, tt.trust); got != tt.want {
				t.Errorf("Match(%q, Host %q, X-Forwarded-Host %q, trust %v) = %v, want %v", tt.origin, tt.host, tt.forwarded, tt.trust, got, tt.want)
			}
		})
	}
}
