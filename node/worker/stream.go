package worker

import (
	"context"
	"errors"
	"io"
	"time"

	"github.com/libp2p/go-libp2p/core/network"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Stream deadlines.
const (
	// RequestReadTimeout bounds how long a client may take to send its
	// request; a stream that never sends is answered TIMEOUT and closed.
	RequestReadTimeout = protocol.RequestTimeout
	// WriteTimeout bounds each event write (the deadline moves once half
	// of it has passed, see protocol.NewFrameWriter), so a client that
	// stops reading cannot hold a slot.
	WriteTimeout = 30 * time.Second
	// maxTrailing is how much a client may send after its request before
	// the stream counts as abusive and the query is cancelled.
	maxTrailing = 4 << 10
	// AcceptedHold is how long the first Accepted may wait for the first
	// output (or the end) to leave with it in one frame: a fraction of
	// any client's bound for Accepted (router.AcceptTimeout, 2.5 s).
	AcceptedHold = 5 * time.Millisecond
)

// HandleStream is the libp2p handler of the query protocol. It serves
// the stream on a kept goroutine (goPool) and returns.
func (w *Worker) HandleStream(s network.Stream) { w.streams.Go(func() { w.handleStream(s) }) }

func (w *Worker) handleStream(s network.Stream) {
	if w.serving != nil {
		p := s.Conn().RemotePeer()
		w.serving(p, 1)
		defer w.serving(p, -1)
	}
	if err := s.Scope().ReserveMemory(64<<10, network.ReservationPriorityAlways); err != nil {
		log.Debugw("refusing stream: resource limit", "peer", s.Conn().RemotePeer(), "err", err)
		_ = s.SetWriteDeadline(time.Now().Add(time.Second))
		_ = protocol.WriteFrame(s, errEvent(protocol.Errorf(protocol.CodeBusy, "worker out of resources")))
		// The reset may overtake the BUSY frame; its code says busy too
		// (docs/protocol.md), where a plain reset would say dead.
		_ = s.ResetWithError(network.StreamResourceLimitExceeded)
		return
	}
	defer s.Scope().ReleaseMemory(64 << 10)

	_ = s.SetReadDeadline(time.Now().Add(RequestReadTimeout))
	fr := protocol.NewFrameReader(s, protocol.MaxRequestFrame)
	// The request's memory counts against the resource manager's limits
	// for this protocol and peer, so media uploads are bounded there too.
	var reserved int
	fr.SetReserve(func(n int) error {
		if err := s.Scope().ReserveMemory(n, network.ReservationPriorityMedium); err != nil {
			return err
		}
		reserved += n
		return nil
	})
	defer func() { s.Scope().ReleaseMemory(reserved) }()
	var req pb.QueryRequest
	if err := fr.Read(&req); err != nil {
		perr := readError(err)
		log.Debugw("bad request stream", "peer", s.Conn().RemotePeer(), "err", err)
		_ = s.SetWriteDeadline(time.Now().Add(5 * time.Second))
		if protocol.WriteFrame(s, errEvent(perr)) != nil {
			_ = s.Reset()
			return
		}
		_ = s.Close()
		return
	}
	_ = s.SetReadDeadline(time.Time{})
	// Count the stream as in flight until its last frame is written, so a
	// graceful shutdown does not close the connection under a Done.
	w.inflight.Add(1)
	defer w.inflight.Add(-1)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// A reset from the client (or data it should not send) cancels the
	// backend call at once.
	w.streams.Go(func() { watchReset(s, cancel) })

	// Events are written from a goroutine of their own: tokens that come
	// while a write is under way go out together in the next one, one
	// yamux frame and syscall for the batch instead of one per token.
	// The first Accepted waits a moment for the first output: an answer
	// that starts at once then costs one frame less.
	fw := protocol.NewFrameWriter(s, s.SetWriteDeadline, WriteTimeout)
	first := true
	// fw encodes each event at once: the sink may reuse its chunk event.
	done, err := w.serve(ctx, s.Conn().RemotePeer(), &req, func(ev *pb.Event) error {
		if _, acc := ev.GetKind().(*pb.Event_Accepted); acc && first {
			first = false
			return fw.WriteSoon(ev, AcceptedHold)
		}
		return fw.Write(ev)
	}, true)
	var last *pb.Event
	if err != nil {
		last = errEvent(protocol.AsError(err))
	} else {
		last = &pb.Event{Kind: &pb.Event_Done{Done: done}}
	}
	err = fw.Write(last)
	if errors.Is(err, protocol.ErrEncode) {
		log.Warnw("answer's end cannot be encoded", "err", err)
		err = fw.Write(errEvent(protocol.Errorf(protocol.CodeInternal, "the worker could not encode the answer's end")))
	}
	// Close always: it ends the writer's goroutine.
	if cerr := fw.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = s.Reset()
		return
	}
	if w.onServed != nil && done.GetReceipt() != nil {
		w.onServed(done.GetReceipt())
	}
	_ = s.Close()
}

// watchReset reads past the request until the stream ends. A clean EOF is
// the client's close-write and changes nothing; an error (reset) or too
// many trailing bytes cancels the query.
func watchReset(s network.Stream, cancel context.CancelFunc) {
	n, err := io.Copy(io.Discard, io.LimitReader(s, maxTrailing+1))
	if err != nil || n > maxTrailing {
		cancel()
	}
}

func errEvent(e *protocol.Error) *pb.Event {
	return &pb.Event{Kind: &pb.Event_Error{Error: e.Proto()}}
}

// readError types a failure to read the request frame.
func readError(err error) *protocol.Error {
	switch {
	case errors.Is(err, protocol.ErrNoMemory):
		return protocol.Errorf(protocol.CodeBusy, "worker has no memory for this request now")
	case errors.Is(err, protocol.ErrFrameTooLarge):
		return protocol.Errorf(protocol.CodeTooLarge, "request %v", err)
	case errors.Is(err, protocol.ErrMalformedFrame):
		return protocol.Errorf(protocol.CodeBadRequest, "request is not a valid QueryRequest frame: %v", err)
	case protocol.IsTimeout(err):
		return protocol.Errorf(protocol.CodeTimeout, "no request within %s", RequestReadTimeout)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return protocol.Errorf(protocol.CodeBadRequest, "stream ended before a complete request")
	}
	return protocol.Errorf(protocol.CodeBadRequest, "reading request: %v", err)
}
