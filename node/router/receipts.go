package router

import (
	"errors"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"

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
// it to consumed. A receipt that fails the check is refused: logged, not
// passed on, and a protocol violation of the worker.
func WithReceipts(key crypto.PrivKey, consumed func(*pb.Receipt)) Option {
	return func(r *Router) { r.receipts = &receipts{key: key, consumed: consumed} }
}

// receiptCheck is the receipt of one attempt: the hash of the output the
// worker sent in it.
type receiptCheck struct{ output *receipt.OutputHash }

func (r *Router) newReceiptCheck() *receiptCheck {
	if r.receipts == nil {
		return nil
	}
	return &receiptCheck{output: receipt.NewOutputHash()}
}

// add hashes one event of the attempt.
func (c *receiptCheck) add(ev *pb.Event) {
	if c != nil {
		c.output.Add(ev)
	}
}

// errNoReceipt is a Done without a receipt, from a worker before receipts.
var errNoReceipt = errors.New("no receipt")

// settle checks the receipt of done, the answer of worker p to req, and
// countersigns and records it; a refused receipt is removed from done and
// the worker's breaker records a violation. local is p being this node's
// own worker, whose receipt was signed in this process with our key. It
// must run before done is changed (a continued answer's usage).
func (r *Router) settle(c *receiptCheck, p peer.ID, local bool, req *pb.QueryRequest, done *pb.Done) error {
	if c == nil || done == nil {
		return nil
	}
	rc := done.GetReceipt()
	if rc == nil {
		log.Debugw("answer without a receipt", "peer", p)
		return errNoReceipt
	}
	err := receipt.Check(rc, receipt.Expect{Request: req, Done: done, Output: c.output.Sum(), Worker: p, Requester: r.h.ID(), SignedHere: local})
	if err == nil {
		err = receipt.Countersign(rc, r.receipts.key)
	}
	if err != nil {
		done.Receipt = nil
		log.Warnw("receipt refused", "peer", p, "query", req.GetId(), "err", err)
		if p != r.h.ID() {
			r.mu.Lock()
			r.state(p).tracker.Record(health.Violation)
			r.mu.Unlock()
		}
		return err
	}
	if r.receipts.consumed != nil {
		r.receipts.consumed(rc)
	}
	return nil
}
