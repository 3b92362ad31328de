package membership

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
)

// benchHost is a loopback libp2p host, with membership when o is set.
func benchHost(b *testing.B, o *Owner) (host.Host, *Membership) {
	b.Helper()
	if o == nil {
		return newHost(b, transports[0]), nil
	}
	m, h := attached(b, o, transports[0], false)
	return h, m
}

// connectOnce connects a to z afresh and waits, in a closed swarm, until
// each holds the other's certificate.
func connectOnce(b *testing.B, a, z host.Host, ma, mz *Membership) time.Duration {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_ = a.Network().ClosePeer(z.ID())
	for len(a.Network().ConnsToPeer(z.ID())) > 0 || len(z.Network().ConnsToPeer(a.ID())) > 0 {
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	if err := a.Connect(ctx, peer.AddrInfo{ID: z.ID(), Addrs: z.Addrs()}); err != nil {
		b.Fatal(err)
	}
	if ma != nil && (!ma.Await(ctx, z.ID()) || !mz.Await(ctx, a.ID())) {
		b.Fatal("no membership after connecting")
	}
	return time.Since(start)
}

// BenchmarkConnect measures a new connection until both sides may use it:
// in an open swarm at once, in a closed one after the handshake. It
// reports the closed swarm's time as a ratio of the open one's, measured
// in the same run.
func BenchmarkConnect(b *testing.B) {
	k, _, _ := crypto.GenerateEd25519Key(nil)
	o, err := NewOwner(k, "bench")
	if err != nil {
		b.Fatal(err)
	}
	oa, _ := benchHost(b, nil)
	oz, _ := benchHost(b, nil)
	ca, ma := benchHost(b, o)
	cz, mz := benchHost(b, o)
	var open, closed time.Duration
	i := 0
	for b.Loop() {
		// Alternating which goes first, so that neither always runs
		// on a machine just made busy by the other.
		if i%2 == 0 {
			open += connectOnce(b, oa, oz, nil, nil)
			closed += connectOnce(b, ca, cz, ma, mz)
		} else {
			closed += connectOnce(b, ca, cz, ma, mz)
			open += connectOnce(b, oa, oz, nil, nil)
		}
		i++
	}
	b.ReportMetric(float64(open.Microseconds())/float64(b.N), "open-µs/conn")
	b.ReportMetric(float64(closed.Microseconds())/float64(b.N), "closed-µs/conn")
	b.ReportMetric(float64(closed)/float64(open), "closed/open")
}

// BenchmarkVerify measures checking one certificate, signature included:
// the CPU a node spends per handshake on it.
func BenchmarkVerify(b *testing.B) {
	k, _, _ := crypto.GenerateEd25519Key(nil)
	o, _ := NewOwner(k, "bench")
	pk, _, _ := crypto.GenerateEd25519Key(nil)
	id, _ := peer.IDFromPrivateKey(pk)
	c, _ := o.Cert(id, []string{"worker"}, time.Hour, "")
	v := Verifier{Swarm: "bench", Owner: o.ID()}
	for b.Loop() {
		if _, err := v.Verify(c.Encoded, KindCert); err != nil {
			b.Fatal(err)
		}
	}
}
