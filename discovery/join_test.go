package discovery

import (
	"encoding/base64"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

func testPeerID(t testing.TB) peer.ID {
	t.Helper()
	_, pub, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestJoinTokenRoundTrip(t *testing.T) {
	a, b := testPeerID(t), testPeerID(t)
	infos := []peer.AddrInfo{
		{ID: a, Addrs: []ma.Multiaddr{ma.StringCast("/ip4/127.0.0.1/tcp/4001"), ma.StringCast("/ip4/127.0.0.1/udp/4001/quic-v1")}},
		{ID: b, Addrs: []ma.Multiaddr{ma.StringCast("/ip6/::1/tcp/4002")}},
	}
	tok := EncodeJoinToken("lab-7", infos)
	if !strings.HasPrefix(tok, TokenPrefix) {
		t.Fatalf("token %q lacks prefix %q", tok, TokenPrefix)
	}
	if strings.ContainsAny(tok, "+/= \n") {
		t.Fatalf("token %q is not shell- and URL-safe", tok)
	}
	swarm, got, err := ParseJoin("  " + tok + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if swarm != "lab-7" {
		t.Errorf("swarm = %q, want lab-7", swarm)
	}
	if len(got) != len(infos) {
		t.Fatalf("got %d peers, want %d: %v", len(got), len(infos), got)
	}
	for i := range infos {
		if got[i].ID != infos[i].ID {
			t.Errorf("peer %d = %s, want %s", i, got[i].ID, infos[i].ID)
		}
		if len(got[i].Addrs) != len(infos[i].Addrs) {
			t.Fatalf("peer %d has %d addrs, want %d", i, len(got[i].Addrs), len(infos[i].Addrs))
		}
		for j := range infos[i].Addrs {
			if !got[i].Addrs[j].Equal(infos[i].Addrs[j]) {
				t.Errorf("peer %d addr %d = %s, want %s", i, j, got[i].Addrs[j], infos[i].Addrs[j])
			}
		}
	}
}

func token(json string) string {
	return TokenPrefix + base64.RawURLEncoding.EncodeToString([]byte(json))
}

func TestParseJoin(t *testing.T) {
	id := testPeerID(t)
	tcp := "/ip4/127.0.0.1/tcp/4001/p2p/" + id.String()
	quic := "/ip4/127.0.0.1/udp/4001/quic-v1/p2p/" + id.String()
	cases := []struct {
		name      string
		arg       string
		wantSwarm string
		wantAddrs int // addresses of the single expected peer
		wantErr   string
	}{
		{name: "tcp multiaddr", arg: tcp, wantAddrs: 1},
		{name: "quic multiaddr", arg: quic, wantAddrs: 1},
		{name: "multiaddr with spaces", arg: " " + tcp + " ", wantAddrs: 1},
		{name: "token", arg: token(`{"s":"mtor","a":["` + tcp + `","` + quic + `"]}`), wantSwarm: "mtor", wantAddrs: 2},
		{name: "token without swarm", arg: token(`{"a":["` + tcp + `"]}`), wantSwarm: "mtor", wantAddrs: 1},
		{name: "empty", arg: "", wantErr: "empty"},
		{name: "garbage", arg: "hello world", wantErr: "neither"},
		{name: "multiaddr without peer id", arg: "/ip4/127.0.0.1/tcp/4001", wantErr: "/p2p/"},
		{name: "peer id only", arg: "/p2p/" + id.String(), wantErr: "no transport"},
		{name: "bad multiaddr", arg: "/ip4/999.1.1.1/tcp/1/p2p/" + id.String(), wantErr: "join address"},
		{name: "token bad base64", arg: TokenPrefix + "!!!", wantErr: "base64"},
		{name: "token bad json", arg: token(`{"s":`), wantErr: "malformed"},
		{name: "token unknown field", arg: token(`{"s":"mtor","a":["` + tcp + `"],"x":1}`), wantErr: "malformed"},
		{name: "token no addrs", arg: token(`{"s":"mtor","a":[]}`), wantErr: "no addresses"},
		{name: "token bad swarm", arg: token(`{"s":"Bad Swarm","a":["` + tcp + `"]}`), wantErr: "swarm"},
		{name: "token addr without id", arg: token(`{"s":"mtor","a":["/ip4/127.0.0.1/tcp/1"]}`), wantErr: "/p2p/"},
		{name: "token too long", arg: TokenPrefix + strings.Repeat("A", MaxTokenLen), wantErr: "limit"},
		{name: "token too many addrs", arg: token(`{"a":[` + strings.TrimSuffix(strings.Repeat(`"`+tcp+`",`, MaxTokenAddrs+1), ",") + `]}`), wantErr: "addresses, limit"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			swarm, infos, err := ParseJoin(tc.arg)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if swarm != tc.wantSwarm {
				t.Errorf("swarm = %q, want %q", swarm, tc.wantSwarm)
			}
			if len(infos) != 1 || infos[0].ID != id || len(infos[0].Addrs) != tc.wantAddrs {
				t.Fatalf("infos = %v, want peer %s with %d addrs", infos, id, tc.wantAddrs)
			}
		})
	}
}
