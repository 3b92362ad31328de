package discovery

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/connmgr"
)

// The connection manager's trimming does not empty the view: the peers
// the table holds keep their connections (and so their entries), while a
// connected peer that is not in the table is trimmed. Before, a view node
// past the manager's high water lost workers from its table at each trim.
func TestTrimKeepsTheTable(t *testing.T) {
	cm, err := connmgr.NewConnManager(1, 2, connmgr.WithGracePeriod(0))
	if err != nil {
		t.Fatal(err)
	}
	hv, err := libp2p.New(libp2p.ListenAddrStrings(tcpAndQUIC...), libp2p.ConnectionManager(cm))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = hv.Close() })
	view := newDiscovery(t, hv)
	const n = 4
	workers := make([]host.Host, n)
	for i := range n {
		workers[i] = newHost(t)
		d := newDiscovery(t, workers[i], WithBootstrap([]peer.AddrInfo{info(hv)}))
		heartbeat(t, d, fmt.Sprintf("model-%d", i), 300*time.Millisecond)
	}
	// Peers connected to the view node that announce nothing: the trim
	// leaves the low water (1) of unprotected connections, so two.
	strangers := []host.Host{newHost(t), newHost(t)}
	for _, s := range strangers {
		if err := s.Connect(context.Background(), info(hv)); err != nil {
			t.Fatal(err)
		}
	}
	waitTable(t, view, "the view to hold every worker", func(es []Entry) bool { return len(es) == n })
	// The protections follow the table's events, asynchronously.
	deadline := time.Now().Add(waitLimit)
	for _, w := range workers {
		for !cm.IsProtected(w.ID(), tableTag) {
			if time.Now().After(deadline) {
				t.Fatalf("worker %s in the table but not protected", w.ID())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	cm.TrimOpenConns(context.Background())
	for i, w := range workers {
		if hv.Network().Connectedness(w.ID()) != network.Connected {
			t.Errorf("worker %d's connection was trimmed", i)
		}
		if _, ok := view.Table().Get(w.ID()); !ok {
			t.Errorf("worker %d left the table at the trim", i)
		}
	}
	if hv.Network().Connectedness(strangers[0].ID()) == network.Connected && hv.Network().Connectedness(strangers[1].ID()) == network.Connected {
		t.Error("no peer outside the table was trimmed: the trim did not run")
	}

	// A worker that leaves the table loses its protection.
	if err := workers[0].Close(); err != nil {
		t.Fatal(err)
	}
	waitTable(t, view, "the closed worker to leave", func(es []Entry) bool { return len(es) == n-1 })
	for deadline := time.Now().Add(waitLimit); cm.IsProtected(workers[0].ID(), tableTag); {
		if time.Now().After(deadline) {
			t.Fatal("a worker gone from the table is still protected")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
