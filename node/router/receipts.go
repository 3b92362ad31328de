package router

import (
	"errors"
	"math"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/health"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

// receipts is how this router checks and countersigns the receipts of the
// answers it routes (docs/protocol.md §6.4).
type receipts struct {
	key crypto.PrivKey
	// consumed gets every countersigned receipt (the ledger).
	consumed func(*pb.Receipt)
}

// WithReceipts has the router check each answer's receipt against what it
// received, countersign it with key (this node's identity key) and pass
// it to consumed: without its countersignature for a query marked
// CountersignLater, and then not at all when the answer came from this
// node's own worker (nobody else holds it: a node records no answer it
// gives itself). A receipt that fails the check is refused: logged, not
// passed on, and a protocol violation of the worker.
func WithReceipts(key crypto.PrivKey, consumed func(*pb.Receipt)) Option {
	return func(r *Router) { r.receipts = &receipts{key: key, consumed: consumed} }
}

// receiptCheck is the receipt of one attempt: the hash of the output the
// worker sent in it, and how much output and time it took, which bound
// the figures the worker may claim (receipt.Observed).
type receiptCheck struct {
	output  *receipt.OutputHash
	start   time.Time
	end     time.Time // the Done's arrival; zero: settled as it comes
	bytes   uint64
	outputs uint64
}

func (r *Router) newReceiptCheck() *receiptCheck {
	if r.receipts == nil {
		return nil
	}
	return &receiptCheck{output: receipt.NewOutputHash(), start: time.Now()}
}

// add hashes and counts one event of the attempt.
func (c *receiptCheck) add(ev *pb.Event) {
	if c == nil {
		return
	}
	c.output.Add(ev)
	switch k := ev.GetKind().(type) {
	case *pb.Event_Chunk:
		c.bytes += uint64(len(k.Chunk.GetText()))
	case *pb.Event_ToolCall:
		c.bytes += uint64(len(k.ToolCall.GetName()) + len(k.ToolCall.GetArguments()))
	case *pb.Event_Media:
		c.bytes += uint64(len(k.Media.GetData()))
	case *pb.Event_Embedding:
		c.bytes += 4 * uint64(len(k.Embedding.GetVector()))
	default:
		return
	}
	c.outputs++
}

// observed is what the attempt showed of req's answer, now that its
// Done has come.
func (c *receiptCheck) observed(req *pb.QueryRequest) *receipt.Observed {
	end := c.end
	if end.IsZero() {
		end = time.Now()
	}
	return &receipt.Observed{Ms: uint32(min(end.Sub(c.start).Milliseconds(), math.MaxUint32)),
		OutputBytes: c.bytes, Outputs: c.outputs, RequestBytes: uint64(proto.Size(req))}
}

// errNoReceipt is a Done without a receipt, from a worker before receipts.
var errNoReceipt = errors.New("no receipt")

// settle checks the receipt of done, the answer of worker p to req, and
// countersigns and records it; a refused receipt is removed from done and
// the worker's breaker records a violation. local is p being this node's
// own worker, whose receipt was signed in this process with our key;
// later, the countersignature left to receiptback (CountersignLater). It
// must run before done is changed (a continued answer's usage).
func (r *Router) settle(c *receiptCheck, p peer.ID, local, later bool, req *pb.QueryRequest, done *pb.Done) error {
	if c == nil || done == nil {
		return nil
	}
	obs := c.observed(req)
	// The figures reach the client's usage whether or not a receipt
	// vouches for them: implausible ones are replaced by what was seen.
	err := receipt.Plausible(done, obs)
	rc := done.GetReceipt()
	switch {
	case err != nil:
	case rc == nil:
		log.Debugw("answer without a receipt", "peer", p)
		return errNoReceipt
	default:
		// Check compares the receipt's figures with the Done's, which
		// Plausible above held to what was seen.
		err = receipt.Check(rc, receipt.Expect{Request: req, Done: done, Output: c.output.Sum(), Worker: p, Requester: r.h.ID(), SignedHere: local})
		if err == nil {
			// Fields no signature covers (a newer worker's) would
			// ride into the ledger and to the client unchecked.
			rc.ProtoReflect().SetUnknown(nil)
		}
		if err == nil && !later {
			err = receipt.Countersign(rc, r.receipts.key)
		}
	}
	if err != nil {
		done.Receipt = nil
		if errors.Is(err, receipt.ErrImplausible) {
			done.Usage = &pb.Usage{PromptTokens: 0, CompletionTokens: uint32(min(obs.Outputs, math.MaxUint32))}
			done.Timing = &pb.Timing{TotalMs: obs.Ms}
			done.EnergyMj = 0
		}
		log.Warnw("receipt refused", "peer", p, "query", req.GetId(), "err", err)
		if p != r.h.ID() {
			r.mu.Lock()
			r.state(p).tracker.Record(health.Violation)
			r.mu.Unlock()
		}
		return err
	}
	if r.receipts.consumed != nil && !(later && local) {
		r.receipts.consumed(rc)
	}
	return nil
}
