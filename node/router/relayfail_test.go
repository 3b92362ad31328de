package router

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/client"
	relayv2 "github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/relay"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// connectedTable lists its candidates only while the host is connected to
// them, as discovery's table does: a peer's last connection closing takes
// it out at once.
type connectedTable struct {
	h     host.Host
	cands []Candidate
}

func (t connectedTable) Candidates() []Candidate {
	var out []Candidate
	for _, c := range t.cands {
		if t.h.Network().Connectedness(c.Peer) == network.Connected {
			out = append(out, c)
		}
	}
	return out
}

// TestRelayKilledMidAnswer: a worker that no one can dial (behind NAT)
// holds reservations on two relays; the router reaches it through the
// first, which dies mid-answer. Closing the broken relayed connection
// takes the worker out of a table of connected peers, and the answer must
// still complete over the second relay, continued by the same worker, on
// TCP and on QUIC.
func TestRelayKilledMidAnswer(t *testing.T) {
	for _, tc := range transports {
		t.Run(tc.name, func(t *testing.T) {
			relay := []libp2p.Option{libp2p.EnableRelayService(relayv2.WithInfiniteLimits()), libp2p.ForceReachabilityPublic()}
			r1, r2 := testHostOn(t, tc.listen, relay...), testHostOn(t, tc.listen, relay...)

			// The worker listens on nothing: only a relay reaches it.
			wh, err := libp2p.New(libp2p.NoListenAddrs, libp2p.EnableRelay())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { wh.Close() })
			w := worker.New([]backend.Backend{demo.New("w", demo.WithDelay(40*time.Millisecond))})
			w.Refresh(context.Background())
			wh.SetStreamHandler(testProto, w.HandleStream)
			var circuits [][]byte
			var r1Circuit ma.Multiaddr
			for _, r := range []host.Host{r1, r2} {
				ai := peer.AddrInfo{ID: r.ID(), Addrs: r.Addrs()}
				if _, err := client.Reserve(t.Context(), wh, ai); err != nil {
					t.Fatalf("reservation on %s: %v", r.ID(), err)
				}
				c := ma.Join(r.Addrs()[0], ma.StringCast("/p2p/"+r.ID().String()+"/p2p-circuit"))
				circuits = append(circuits, c.Bytes())
				if r == r1 {
					r1Circuit = c
				}
			}

			h := testHostOn(t, tc.listen)
			connect(t, h, r1, r2)
			// Reached through the first relay.
			if err := h.Connect(t.Context(), peer.AddrInfo{ID: wh.ID(), Addrs: []ma.Multiaddr{r1Circuit}}); err != nil {
				t.Fatal(err)
			}
			// Both relayed addresses known, as identify tells them.
			for _, b := range circuits {
				h.Peerstore().AddAddr(wh.ID(), ma.Cast(b), time.Hour)
			}
			c := cand(string(wh.ID()), 0, 4, 100, 0, demoModel, canCont, func(a *pb.Announce) { a.Addrs = circuits })
			r := New(h, testProto, connectedTable{h, []Candidate{c}}, WithRetryBackoff(time.Millisecond))

			var text strings.Builder
			chunks := 0
			var killed time.Time
			res, err := r.Query(t.Context(), &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Model: "demo", Prompt: "a story long enough to outlive a relay"},
				func(ev *pb.Event) error {
					switch k := ev.GetKind().(type) {
					case nil:
						t.Error("the handler was told to discard output: a restart, not a continuation")
					case *pb.Event_Chunk:
						text.WriteString(k.Chunk.GetText())
						if chunks++; chunks == 3 {
							killed = time.Now()
							go r1.Close()
						}
					}
					return nil
				})
			if err != nil {
				t.Fatalf("answer lost when the relay in use died: %v (%d chunks received)", err, chunks)
			}
			if want := "[demo answer from w] You said: a story long enough to outlive a relay"; text.String() != want {
				t.Fatalf("answer %q, want %q", text.String(), want)
			}
			if res.Peer != wh.ID() || res.Continued != 1 {
				t.Fatalf("answered by %s, continued %d times; want the same worker, continued once", res.Peer, res.Continued)
			}
			t.Logf("answer complete %s after the relay in use died", time.Since(killed).Round(time.Millisecond))
			for _, conn := range h.Network().ConnsToPeer(wh.ID()) {
				if via, _ := conn.RemoteMultiaddr().ValueForProtocol(ma.P_P2P); via != r2.ID().String() {
					t.Errorf("connection to the worker at %s, want through the second relay", conn.RemoteMultiaddr())
				}
			}
		})
	}
}
