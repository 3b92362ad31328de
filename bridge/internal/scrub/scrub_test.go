package scrub_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/bridge/internal/scrub"
)

func TestAddresses(t *testing.T) {
	const a = scrub.Placeholder
	tests := []struct{ name, in, want string }{
		{"url", `backend failed: Post "http://10.0.0.5:11434/api/chat": refused`, `backend failed: Post "` + a + `": refused`},
		{"multiaddr", "dial /ip4/192.168.1.2/tcp/4001/p2p/12D3Koo failed", "dial " + a + " failed"},
		{"multiaddr ip6", "dial /ip6/::1/udp/4001/quic-v1 failed", "dial " + a + " failed"},
		{"multiaddr dns", "dial /dns4/gpu.example/tcp/1 failed", "dial " + a + " failed"},
		{"ipv4 with port", "connect 172.16.0.1:8080 timed out", "connect " + a + " timed out"},
		{"ipv4 pair", "read tcp4 127.0.0.1:37053->127.0.0.1:38699: reset", "read tcp4 " + a + "->" + a + ": reset"},
		{"ipv4 bare", "no route to 10.1.2.3.", "no route to " + a + "."},
		{"ipv6 bracketed", "connect [fe80::1]:80 refused", "connect " + a + " refused"},
		{"ipv6 loopback bracketed", "dial tcp [::1]:4001: refused", "dial tcp " + a + ": refused"},
		{"ipv6 zone bracketed", "dial [fe80::1%eth0]:80", "dial " + a},
		{"ipv6 bare", "host 2001:db8::7 down", "host " + a + " down"},
		{"ipv6 bare loopback", "listening on ::1, then", "listening on " + a + ", then"},
		{"ipv6 bare zone", "from fe80::1%eth0 at", "from " + a + " at"},
		{"ipv6 full", "peer 2001:0db8:0000:0000:0000:ff00:0042:8329 gone", "peer " + a + " gone"},
		{"ipv6 mapped ipv4", "from ::ffff:10.0.0.1 at", "from " + a + " at"},
		{"ipv6 trailing", "net fe80:: only", "net " + a + " only"},
		{"two bare ipv6", "fe80::1 fe80::2", a + " " + a},
		{"hostname port", "ollama at localhost:11434 is down", "ollama at " + a + " is down"},
		{"fqdn port", "dial gpu-3.lan.example:8000.", "dial " + a + "."},
		{"underscore host port", "dial my_service:8080, retry", "dial " + a + ", retry"},
		{"two host ports", "a.example:1,b.example:2", a + "," + a},
		{"model tag", `model "llama3:8b" is not loaded`, `model "llama3:8b" is not loaded`},
		{"model tag with dot", `model "phi3:3.8b" is not loaded`, `model "phi3:3.8b" is not loaded`},
		{"model tag qwen", `model "qwen2.5:0.5b" missing`, `model "qwen2.5:0.5b" missing`},
		{"time", "at 12:30:45 it failed", "at 12:30:45 it failed"},
		{"rust path", "panicked at std::io::Error", "panicked at std::io::Error"},
		{"index", "history[1]: role must be user", "history[1]: role must be user"},
		{"peer id", "stream to <peer.ID 12*KeV5Mm> failed", "stream to <peer.ID 12*KeV5Mm> failed"},
		{"placeholder stays", a, a},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := scrub.Addresses(tt.in)
			if got != tt.want {
				t.Errorf("Addresses(%q)\n got %q\nwant %q", tt.in, got, tt.want)
			}
			if again := scrub.Addresses(got); again != got {
				t.Errorf("not idempotent: %q -> %q", got, again)
			}
		})
	}
}

// FuzzAddressesRemovesIPv4: whatever surrounds it, an IPv4 address with
// port does not survive.
func FuzzAddressesRemovesIPv4(f *testing.F) {
	f.Add("dial", uint8(10), uint8(0), uint8(0), uint8(1), uint16(80), "refused")
	f.Add("x", uint8(255), uint8(255), uint8(255), uint8(255), uint16(65535), "")
	f.Fuzz(func(t *testing.T, pre string, a, b, c, d uint8, port uint16, post string) {
		ip := fmt.Sprintf("%d.%d.%d.%d:%d", a, b, c, d, port)
		got := scrub.Addresses(pre + " " + ip + " " + post)
		if strings.Contains(got, ip) {
			t.Errorf("%q survived in %q", ip, got)
		}
	})
}
