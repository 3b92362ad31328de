package router

import (
	"crypto/rand"
	"slices"
	"testing"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// TestPeersCountConnections: a peer reached over two connections (here
// two hosts sharing one key, one dialled over QUIC, one dialling in over
// TCP) is listed with both and both transports, one after the other
// closes, and none once it is gone.
func TestPeersCountConnections(t *testing.T) {
	h := testHostOn(t, "/ip4/127.0.0.1/tcp/0", libp2p.ListenAddrStrings("/ip4/127.0.0.1/udp/0/quic-v1"))
	key, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	w1 := testHostOn(t, "/ip4/127.0.0.1/udp/0/quic-v1", libp2p.Identity(key))
	w2 := testHostOn(t, "/ip4/127.0.0.1/tcp/0", libp2p.Identity(key))
	if err := h.Connect(t.Context(), peer.AddrInfo{ID: w1.ID(), Addrs: w1.Addrs()}); err != nil {
		t.Fatal(err)
	}
	var tcp ma.Multiaddr
	for _, a := range h.Addrs() {
		if _, err := a.ValueForProtocol(ma.P_TCP); err == nil {
			tcp = a
		}
	}
	if err := w2.Connect(t.Context(), peer.AddrInfo{ID: h.ID(), Addrs: []ma.Multiaddr{tcp}}); err != nil {
		t.Fatal(err)
	}
	r := New(h, "/test", staticTable{cand(string(w1.ID()), 0, 4, 100, 0)})
	view := func() PeerView {
		t.Helper()
		ps := r.Peers()
		if len(ps) != 1 {
			t.Fatalf("peers = %+v, want the one worker", ps)
		}
		return ps[0]
	}
	for _, tc := range []struct {
		name       string
		close      func()
		conns      int
		path       string
		transports []string
	}{
		{"both", func() {}, 2, "direct", []string{"quic-v1", "tcp"}},
		{"one closed", func() { _ = w2.Close() }, 1, "direct", []string{"quic-v1"}},
		{"none", func() { _ = w1.Close() }, 0, "", nil},
	} {
		tc.close()
		waitUntil(t, func() bool { return len(h.Network().ConnsToPeer(w1.ID())) == tc.conns })
		if v := view(); v.Connections != tc.conns || v.Path != tc.path || !slices.Equal(v.Transports, tc.transports) {
			t.Errorf("%s: connections %d, path %q, transports %q; want %d, %q, %q", tc.name, v.Connections, v.Path, v.Transports, tc.conns, tc.path, tc.transports)
		}
	}
}
