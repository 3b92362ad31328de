package hostcheck_test

import (
	"errors"
	"net"
	"testing"

	"github.com/mtor-swarm/mtor/node/api/hostcheck"
)

func TestLoopback(t *testing.T) {
	for _, tc := range []struct {
		host string
		want bool
	}{
		{"127.0.0.1:5050", true}, {"127.8.9.10", true}, {"localhost:5050", true}, {"LOCALHOST", true},
		{"localhost.", true}, {"[::1]:5050", true}, {"::1", true},
		{"localhost.evil.example", false}, {"evil.localhost.example:1", false}, {"example.com:5050", false},
		{"192.168.1.1", false}, {"0.0.0.0", false}, {"", false},
	} {
		if got := hostcheck.Loopback(tc.host); got != tc.want {
			t.Errorf("Loopback(%q) = %v, want %v", tc.host, got, tc.want)
		}
	}
}

func TestLoopbackAddr(t *testing.T) {
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"127.0.0.1:1", true}, {"127.8.9.10:1", true}, {"[::1]:1", true},
		{"10.0.0.1:1", false}, {"0.0.0.0:1", false}, {"[::]:1", false}, {"nonsense", false},
	} {
		if got := hostcheck.LoopbackAddr(tc.addr); got != tc.want {
			t.Errorf("LoopbackAddr(%q) = %v, want %v", tc.addr, got, tc.want)
		}
	}
}

func TestAllowed(t *testing.T) {
	lan := &net.TCPAddr{IP: net.ParseIP("192.168.1.20"), Port: 8080}
	named, err := hostcheck.New("gpu.example", "Bridge.Example:8443")
	if err != nil {
		t.Fatal(err)
	}
	anyHost, err := hostcheck.New("*")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		allow *hostcheck.Allow
		host  string
		local net.Addr
		want  bool
	}{
		{"loopback, no names", nil, "127.0.0.1:8080", nil, true},
		{"localhost, no names", nil, "localhost:8080", nil, true},
		{"rebinding name", nil, "evil.example:8080", nil, false},
		{"rebinding name, with names", named, "evil.example:8080", lan, false},
		{"given name", named, "gpu.example:8080", nil, true},
		{"given name, other port", named, "bridge.example", nil, true},
		{"given name, case", named, "GPU.EXAMPLE", nil, true},
		{"suffix of a given name", named, "evil-gpu.example", nil, false},
		{"sub-domain of a given name", named, "x.gpu.example", nil, false},
		{"the connection's own address", nil, "192.168.1.20:8080", lan, true},
		{"another address", nil, "192.168.1.21:8080", lan, false},
		{"an address, connection unknown", nil, "192.168.1.20:8080", nil, false},
		{"empty", named, "", lan, false},
		{"star", anyHost, "evil.example", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.allow.Allowed(tc.host, tc.local); got != tc.want {
				t.Errorf("Allowed(%q, %v) = %v, want %v", tc.host, tc.local, got, tc.want)
			}
		})
	}
}

func TestNewRefusesWhatIsNoName(t *testing.T) {
	for _, n := range []string{"", "http://gpu.example", "gpu.example/path", "user@gpu.example", "a b"} {
		if _, err := hostcheck.New(n); !errors.Is(err, hostcheck.ErrBadName) {
			t.Errorf("New(%q) = %v, want ErrBadName", n, err)
		}
	}
}
