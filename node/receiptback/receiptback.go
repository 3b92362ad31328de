// Package receiptback returns countersigned receipts to the workers that
// signed them (docs/protocol.md §6.4, "Returning the countersignature"),
// so that a worker's ledger holds what it served with both signatures.
// Receipts that come checked but not yet countersigned are countersigned
// here, a batch with one signature (receipt protocol 1.1.0), or one by
// one for a worker that speaks only 1.0.0. The exchange is best effort:
// bounded, batched, never on a query's path.
package receiptback

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	libp2pproto "github.com/libp2p/go-libp2p/core/protocol"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/liveness"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

var log = logging.Logger("mtor/receiptback")

// Defaults; docs/protocol.md §6.4 states the same.
const (
	DefaultFlushInterval = 500 * time.Millisecond
	// StreamTimeout bounds one receipt stream, on either side.
	StreamTimeout = 5 * time.Second
	maxWaiting    = 1024 // receipts queued for sending
	maxStreams    = 4    // receipt streams open at once
	// maxRetryStreams of them may be later tries of failed batches.
	maxRetryStreams = maxStreams / 2
	// RetryFor is how long a batch whose stream failed is tried again
	// (and waits for its worker to be connected again): a volunteer's
	// process paused, its link dark for a moment, its network dropped
	// and back (the same process still awaits the receipts), or a
	// restart (the ledger's file keeps what it signed).
	RetryFor = 30 * time.Second
)

// Sender gathers receipts per worker, countersigns those that need it
// and sends them back.
type Sender struct {
	h        host.Host
	proto    libp2pproto.ID
	batch    libp2pproto.ID    // the 1.1.0 protocol; "" for none
	key      crypto.PrivKey    // countersigns the receipts that come without
	signed   func(*pb.Receipt) // each receipt countersigned here, once
	flush    time.Duration
	timeout  time.Duration // one stream's
	retryFor time.Duration // how long a failed batch is tried again
	in       chan *pb.Receipt
	dropped  atomic.Uint64
	sent     atomic.Uint64
	retried  atomic.Uint64 // streams that were a batch's later tries
	// stopped: Run has ended, and Add countersigns at once; the lock
	// orders an Add against the last look at in.
	mu      sync.RWMutex
	stopped bool
}

// Option configures a Sender.
type Option func(*Sender)

// WithFlushInterval sets how long receipts for one worker are gathered.
func WithFlushInterval(d time.Duration) Option {
	return func(s *Sender) {
		if d > 0 {
			s.flush = d
		}
	}
}

// WithRetryFor bounds how long a batch whose stream failed is tried
// again, from its first failure (RetryFor by default).
func WithRetryFor(d time.Duration) Option {
	return func(s *Sender) {
		if d > 0 {
			s.retryFor = d
		}
	}
}

// WithStreamTimeout bounds each stream (StreamTimeout by default).
func WithStreamTimeout(d time.Duration) Option {
	return func(s *Sender) {
		if d > 0 {
			s.timeout = d
		}
	}
}

// WithBatches has the Sender countersign the receipts it gets without a
// countersignature, with key (this node's identity key): those for one
// worker with one signature when the worker speaks batchProto
// (protocol.ReceiptBatchProtocol), or when it cannot be reached, and one
// by one for a worker that speaks only the Sender's other protocol.
// signed gets each receipt once it is countersigned (the ledger), sent
// or not: one that finds no room waiting is countersigned at once.
func WithBatches(batchProto libp2pproto.ID, key crypto.PrivKey, signed func(*pb.Receipt)) Option {
	return func(s *Sender) { s.batch, s.key, s.signed = batchProto, key, signed }
}

// NewSender sends over h with the receipt protocol proto
// (protocol.ReceiptProtocol). Run must be running for anything to leave.
func NewSender(h host.Host, proto libp2pproto.ID, opts ...Option) *Sender {
	s := &Sender{h: h, proto: proto, flush: DefaultFlushInterval, timeout: StreamTimeout, retryFor: RetryFor, in: make(chan *pb.Receipt, maxWaiting)}
	for _, o := range opts {
		o(s)
	}
	return s
}

// Add queues r for the worker that signed it. It never blocks: with no
// room, r is dropped (and counted), countersigned first if need be.
func (s *Sender) Add(r *pb.Receipt) {
	s.mu.RLock()
	if !s.stopped {
		select {
		case s.in <- r:
			s.mu.RUnlock()
			return
		default:
		}
	}
	s.mu.RUnlock()
	s.drop([]*pb.Receipt{r})
}

// drop gives up sending rs; those still to countersign are, in one batch,
// so that the ledger has them all the same.
func (s *Sender) drop(rs []*pb.Receipt) {
	s.dropped.Add(uint64(len(rs)))
	s.countersign(rs, true)
}

// countersign countersigns the receipts of rs that come without a
// countersignature: with one signature (batch) or one each, and passes
// each to signed. A receipt that fails is logged and left unsigned.
func (s *Sender) countersign(rs []*pb.Receipt, batch bool) {
	if s.key == nil {
		return
	}
	var todo []*pb.Receipt
	for _, r := range rs {
		if !receipt.Countersigned(r) {
			todo = append(todo, r)
		}
	}
	if len(todo) == 0 {
		return
	}
	if batch {
		if err := receipt.CountersignBatch(todo, s.key); err != nil {
			log.Warnw("countersigning a batch of receipts failed", "receipts", len(todo), "err", err)
			return
		}
	} else {
		for _, r := range todo {
			if err := receipt.Countersign(r, s.key); err != nil {
				log.Warnw("countersigning a receipt failed", "err", err)
			}
		}
	}
	if s.signed != nil {
		for _, r := range todo {
			if receipt.Countersigned(r) {
				s.signed(r)
			}
		}
	}
}

// Stats reports the receipts sent and dropped so far.
func (s *Sender) Stats() (sent, dropped uint64) { return s.sent.Load(), s.dropped.Load() }

// Retried reports how many streams were a batch's later tries.
func (s *Sender) Retried() uint64 { return s.retried.Load() }

// Run sends batches until ctx ends; receipts still waiting then are
// dropped.
func (s *Sender) Run(ctx context.Context) {
	var wg sync.WaitGroup
	// Receipts wait per worker until a stream is free: one tick opens at
	// most maxStreams, and the rest wait for the next (a router that
	// countersigned for many workers in one period loses none); only
	// receipts beyond maxWaiting held are dropped. A batch whose stream
	// failed in any way but the worker refusing the protocol waits in
	// retry and goes again, while its worker is connected, each try later
	// after the last failure (backoff), until RetryFor after its first
	// failure; past that it has one more try if its worker is connected,
	// and is dropped if not. So receipts outlast a worker paused a moment
	// (SIGSTOP, a laptop's lid), a link dark for seconds under a live
	// connection, and a network that dropped and came back: the same
	// process awaits them, and a restarted one finds them in its ledger.
	// Later tries hold at most maxRetryStreams of the streams, one per
	// worker, so that workers gone dark do not keep the others' first
	// tries waiting.
	batches := map[peer.ID][]*pb.Receipt{}
	retry := map[peer.ID]*retrying{}
	finished := make(chan outcome, maxStreams)
	streams, retries := 0, 0
	busy := map[peer.ID]bool{} // a later try to the worker in flight
	held := 0
	defer func() {
		// Stopping: what waits is countersigned (the ledger has it),
		// not sent; so is what comes later (Add).
		s.mu.Lock()
		s.stopped = true
		s.mu.Unlock()
		for more := true; more; {
			select {
			case r := <-s.in:
				p := peer.ID(r.GetWorker())
				batches[p] = append(batches[p], r)
			default:
				more = false
			}
		}
		wg.Wait()
		close(finished)
		for o := range finished {
			batches[o.p] = append(batches[o.p], o.b...)
		}
		for p, r := range retry {
			batches[p] = append(batches[p], r.b...)
		}
		for _, b := range batches {
			for len(b) > 0 {
				n := min(len(b), protocol.MaxReceiptBatch)
				s.drop(b[:n])
				b = b[n:]
			}
		}
	}()
	// next takes the first MaxReceiptBatch receipts of *all.
	next := func(all *[]*pb.Receipt) []*pb.Receipt {
		n := min(len(*all), protocol.MaxReceiptBatch)
		b := (*all)[:n:n]
		*all = (*all)[n:]
		held -= n
		return b
	}
	// try sends b to p from a goroutine of its own, with the batch's
	// history st (zero: a first try); the loop hears how it ended.
	try := func(p peer.ID, b []*pb.Receipt, st tries, last bool) {
		streams++
		later := st.n > 0
		if later {
			retries++
			busy[p] = true
			s.retried.Add(1)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			o := outcome{p: p, later: later}
			if err := s.send(ctx, p, b); err == nil {
				s.sent.Add(uint64(len(b)))
			} else if last || !worthAnotherTry(err) || ctx.Err() != nil {
				log.Debugw("returning receipts failed", "peer", p, "receipts", len(b), "again", false, "tries", st.n+1, "err", err)
				s.drop(b)
			} else {
				log.Debugw("returning receipts failed", "peer", p, "receipts", len(b), "again", true, "tries", st.n+1,
					"connected", connected(s.h.Network().Connectedness(p)), "err", err)
				now := time.Now()
				if st.n == 0 {
					st.until = now.Add(s.retryFor)
				}
				st.n++
				st.after = now.Add(s.backoff(st.n))
				o.b, o.st = b, st
			}
			select {
			case finished <- o:
			case <-ctx.Done(): // the loop is stopping: it drops what waits
				s.drop(o.b)
			}
		}()
	}
	t := time.NewTicker(s.flush)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case r := <-s.in:
			if held >= maxWaiting {
				s.drop([]*pb.Receipt{r})
				continue
			}
			p := peer.ID(r.GetWorker())
			batches[p] = append(batches[p], r)
			held++
			if all := batches[p]; len(all) >= protocol.MaxReceiptBatch && streams < maxStreams {
				try(p, next(&all), tries{}, false)
				if len(all) == 0 {
					delete(batches, p)
				} else {
					batches[p] = all
				}
			}
		case o := <-finished:
			streams--
			if o.later {
				retries--
				delete(busy, o.p)
			}
			if len(o.b) == 0 {
				continue
			}
			if held+len(o.b) > maxWaiting {
				s.drop(o.b)
				continue
			}
			held += len(o.b)
			r := retry[o.p]
			if r == nil {
				r = &retrying{st: o.st}
				retry[o.p] = r
			} else {
				r.st = r.st.merge(o.st)
			}
			r.b = append(r.b, o.b...)
		case <-t.C:
			// Batches that failed first: they have waited already.
			now := time.Now()
			for p, r := range retry {
				last := !now.Before(r.st.until)
				switch {
				case busy[p] || now.Before(r.st.after):
				case !connected(s.h.Network().Connectedness(p)):
					if last { // away past its bound
						held -= len(r.b)
						s.drop(r.b)
						delete(retry, p)
					}
				case streams < maxStreams && retries < maxRetryStreams:
					try(p, next(&r.b), r.st, last)
					if len(r.b) == 0 {
						delete(retry, p)
					}
				}
			}
			for p, all := range batches {
				if streams >= maxStreams {
					break
				}
				try(p, next(&all), tries{}, false)
				if len(all) == 0 {
					delete(batches, p)
				} else {
					batches[p] = all
				}
			}
		}
	}
}

// tries is a batch's history of failed streams.
type tries struct {
	n     int       // streams that failed
	until time.Time // RetryFor after the first failure: then a last try
	after time.Time // no try before: the backoff after the last failure
}

// merge is the history of two batches for one worker waiting together:
// tried as often as the more tried, not before either's backoff ends,
// and within the older one's bound, so that batches failing one after
// the other do not keep the first ones waiting past theirs.
func (a tries) merge(b tries) tries {
	a.n = max(a.n, b.n)
	if b.until.Before(a.until) {
		a.until = b.until
	}
	if b.after.After(a.after) {
		a.after = b.after
	}
	return a
}

// backoff is the wait before a batch's next try after its nth failure:
// one flush, doubling, at most a stream's bound (tries go at flushes, so
// each wait ends at the first flush after it). A worker that keeps
// resetting the stream is asked about ten times in RetryFor; one whose
// link is dark, every 6 to 10 s (its own 5 s of stream timeout, then the
// wait).
func (s *Sender) backoff(n int) time.Duration {
	return min(s.flush<<min(n-1, 16), s.timeout)
}

// outcome is how a try ended: b, the batch to try again (with its
// history st), nil when it was taken or dropped.
type outcome struct {
	p     peer.ID
	b     []*pb.Receipt
	st    tries
	later bool // a later try
}

// retrying is what waits for another try, for one worker.
type retrying struct {
	b  []*pb.Receipt
	st tries
}

// worthAnotherTry reports whether a batch whose stream failed with err
// may go through on another: not when the worker refused the protocol
// (at once, or resetting a stream opened on what its announced protocols
// promised). A stream the worker let time out is tried again: a process
// paused for a few seconds (a laptop's lid, a SIGSTOP) or a link dark
// under a live connection takes a later one, while on QUIC the first
// one's reset had thrown away what it carried.
func worthAnotherTry(err error) bool {
	return !liveness.RefusedProtocol(err)
}

// connected: the worker is still reached, directly or through a relay.
func connected(c network.Connectedness) bool {
	return c == network.Connected || c == network.Limited
}

// send writes one batch to p on a connection that already exists: a
// worker that just answered is connected, and one that is gone is not
// worth a dial. The receipts are countersigned once the protocol is
// known; a batch whose stream did not open stays as it was until it is
// tried again (its worker back, and perhaps speaking only 1.0.0) or
// dropped (drop countersigns it then, for the ledger). The worker closes the
// stream once it has taken the batch: that close, which a reset or a
// silence of the stream timeout is not, says the batch arrived.
func (s *Sender) send(ctx context.Context, p peer.ID, b []*pb.Receipt) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	protos := []libp2pproto.ID{s.proto}
	if s.batch != "" {
		protos = []libp2pproto.ID{s.batch, s.proto}
	}
	st, err := s.h.NewStream(network.WithAllowLimitedConn(network.WithNoDial(ctx, "receipts"), "receipts"), p, protos...)
	if err != nil {
		return err
	}
	s.countersign(b, s.batch != "" && st.Protocol() == s.batch)
	defer context.AfterFunc(ctx, func() { _ = st.Reset() })()
	_ = st.SetDeadline(time.Now().Add(s.timeout))
	fail := func(err error) error {
		_ = st.Reset()
		if e := ctx.Err(); e != nil { // the reset above may be the timeout's
			err = fmt.Errorf("%w: %w", e, err)
		}
		return err
	}
	if err := protocol.WriteFrame(st, &pb.ReceiptBatch{Receipts: b}); err != nil {
		return fail(err)
	}
	if err := st.CloseWrite(); err != nil {
		return fail(err)
	}
	// The worker sends nothing back: its close is the end of the stream.
	if n, err := st.Read(make([]byte, 1)); n > 0 || !errors.Is(err, io.EOF) {
		return fail(fmt.Errorf("the worker did not take the batch: %d bytes, %w", n, err))
	}
	_ = st.Close() // taken: what the close says no longer matters
	return nil
}

// Receiver is the worker side: it takes the countersigned receipts of
// answers this node served.
type Receiver struct {
	self    peer.ID
	pending func(queryID, workerSig []byte) *pb.Receipt
	take    func(*pb.Receipt) error
}

// NewReceiver passes each returned receipt of an answer this node served
// to take (ledger.Countersigned). pending (ledger.Pending) gives the
// receipt this node signed for a query with a worker signature (two for
// a query served twice), awaiting its countersignature: a returned
// receipt must carry the same worker signature and name self
// as worker and the stream's peer as requester, and its
// countersignature must verify over the receipt this node signed. What
// take gets is that receipt with the countersignature: the worker's
// signature is this node's own and is not checked again.
func NewReceiver(self peer.ID, pending func(queryID, workerSig []byte) *pb.Receipt, take func(*pb.Receipt) error) *Receiver {
	return &Receiver{self: self, pending: pending, take: take}
}

// HandleStream is the libp2p handler of the receipt protocol.
func (rv *Receiver) HandleStream(s network.Stream) {
	_ = s.SetDeadline(time.Now().Add(StreamTimeout))
	fr := protocol.NewFrameReader(s, protocol.MaxReceiptFrame)
	var reserved int
	fr.SetReserve(func(n int) error {
		if err := s.Scope().ReserveMemory(n, network.ReservationPriorityLow); err != nil {
			return err
		}
		reserved += n
		return nil
	})
	defer func() { s.Scope().ReleaseMemory(reserved) }()
	var b pb.ReceiptBatch
	from := s.Conn().RemotePeer()
	if err := fr.Read(&b); err != nil || len(b.GetReceipts()) > protocol.MaxReceiptBatch {
		log.Debugw("bad receipt stream", "peer", from, "err", err, "receipts", len(b.GetReceipts()))
		_ = s.Reset()
		return
	}
	taken := 0
	for _, r := range b.GetReceipts() {
		if err := rv.check(from, r); err != nil {
			log.Debugw("returned receipt ignored", "peer", from, "err", err)
			continue
		}
		taken++
	}
	log.Debugw("countersigned receipts returned", "peer", from, "taken", taken, "sent", len(b.GetReceipts()))
	_ = s.Close()
}

// errForeign is a receipt that is not about this worker and that peer.
type errForeign struct{}

func (errForeign) Error() string { return "receipt names another worker or requester" }

// errNotServed is a receipt of no answer this node awaits a
// countersignature for.
type errNotServed struct{}

func (errNotServed) Error() string { return "receipt of no answer awaiting its countersignature" }

// errNotSigned is a receipt that differs from the one this node signed.
type errNotSigned struct{}

func (errNotSigned) Error() string { return "receipt differs from the one this worker signed" }

func (rv *Receiver) check(from peer.ID, r *pb.Receipt) error {
	if peer.ID(r.GetWorker()) != rv.self || peer.ID(r.GetRequester()) != from {
		return errForeign{}
	}
	mine := rv.pending(r.GetQueryId(), r.GetWorkerSig())
	if mine == nil {
		return errNotServed{}
	}
	// Field for field the receipt this node signed, and so its worker
	// signature is good; only the countersignature is left to check
	// (a batch's: one signature check for the whole batch).
	mine.RouterSig, mine.RouterBatch = r.GetRouterSig(), r.GetRouterBatch()
	if !proto.Equal(mine, r) {
		return errNotSigned{}
	}
	if err := receipt.VerifyRouter(mine); err != nil {
		return err
	}
	return rv.take(mine)
}
