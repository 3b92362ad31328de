package hostiletest

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

// Behaviour is how a hostile worker answers a query stream.
type Behaviour int

const (
	// Stall accepts the query and then sends only heartbeats, forever.
	Stall Behaviour = iota + 1
	// Endless accepts and streams chunks without end.
	Endless
	// Fail answers every query with a retryable BACKEND_ERROR, for a
	// model it keeps announcing with full health.
	Fail
	// Silent reads the request and never answers at all.
	Silent
	// FakeQueue accepts at queue position 2^31 and counts down, a step
	// every 200 ms: progress in form only, holding the query.
	FakeQueue
	// EmptyChunks accepts and sends empty chunks, one every 100 ms.
	EmptyChunks
	// ToolCall answers with a tool call the query never offered.
	ToolCall
	// MediaToChat answers a chat with an image.
	MediaToChat
	// InventedFigures answers, then ends with a Done, and a receipt
	// signed over it, claiming 4·10^9 tokens, 4·10^9 ms and 2^62 mJ.
	InventedFigures
	// EmptyAnswer answers at once with nothing: Accepted, then a Done.
	EmptyAnswer
	// QueueWithin is FakeQueue within what its announcement explains
	// (no more ahead than its concurrency plus 64): it accepts at queue
	// position 120 and counts down a step every 300 ms, then heartbeats
	// at the front, never answering. An honest worker whose queue is
	// that slow looks the same, so it is moved from, not blamed.
	QueueWithin
	// EarlyTimeout accepts and at once answers TIMEOUT, as a worker
	// whose clock runs minutes ahead of the router's does (the query's
	// deadline has passed by its clock), or one whose backend times out
	// at once.
	EarlyTimeout
)

var behaviourNames = map[Behaviour]string{
	Stall: "stall", Endless: "endless", Fail: "fail", Silent: "silent",
	FakeQueue: "fake-queue", EmptyChunks: "empty-chunks", ToolCall: "tool-call",
	MediaToChat: "media-to-chat", InventedFigures: "invented-figures", EmptyAnswer: "empty-answer",
	QueueWithin: "queue-within", EarlyTimeout: "early-timeout",
}

func (b Behaviour) String() string {
	if n, ok := behaviourNames[b]; ok {
		return n
	}
	return fmt.Sprintf("Behaviour(%d)", int(b))
}

// ParseBehaviour is the Behaviour named name (its String).
func ParseBehaviour(name string) (Behaviour, error) {
	for b, n := range behaviourNames {
		if n == name {
			return b, nil
		}
	}
	return 0, fmt.Errorf("hostile peer: no behaviour %q", name)
}

// HostileAnswer is the text a hostile worker that answers sends, so that
// a test can tell its answers from an honest worker's.
const HostileAnswer = "hostile answer "

// Handler is a query stream handler of h that answers with b until ctx
// ends; served is called for each stream it is handed.
func Handler(ctx context.Context, h host.Host, b Behaviour, served func()) network.StreamHandler {
	return func(s network.Stream) {
		clean := false // the answer ended as the protocol says: close, not reset
		defer func() {
			if clean {
				_ = s.Close()
			} else {
				_ = s.Reset()
			}
		}()
		served()
		var req pb.QueryRequest
		if err := protocol.NewFrameReader(s, protocol.MaxRequestFrame).Read(&req); err != nil {
			return
		}
		out := receipt.NewOutputHash()
		write := func(ev *pb.Event) error {
			out.Add(ev)
			_ = s.SetWriteDeadline(time.Now().Add(5 * time.Second))
			return protocol.WriteFrame(s, ev)
		}
		accepted := func(pos uint32) *pb.Event {
			return &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{QueuePosition: pos, HeartbeatMs: 250}}}
		}
		pace := func(d time.Duration) bool {
			select {
			case <-ctx.Done():
				return false
			case <-time.After(d):
				return true
			}
		}
		switch b {
		case Silent:
			_, _ = io.Copy(io.Discard, s)
			<-ctx.Done() // hold the stream open, answering nothing
		case Stall:
			for write(accepted(0)) == nil && pace(200*time.Millisecond) {
			}
		case Endless:
			if write(accepted(0)) != nil {
				return
			}
			chunk := &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "spam spam spam spam "}}}
			for write(chunk) == nil && ctx.Err() == nil {
			}
		case Fail:
			_ = write(accepted(0))
			clean = write(&pb.Event{Kind: &pb.Event_Error{Error: protocol.Errorf(protocol.CodeBackendError, "backend exploded").Proto()}}) == nil
		case EarlyTimeout:
			_ = write(accepted(0))
			clean = write(&pb.Event{Kind: &pb.Event_Error{Error: protocol.Errorf(protocol.CodeTimeout, "deadline passed before the query started").Proto()}}) == nil
		case FakeQueue:
			for pos := uint32(1 << 31); pos > 0 && write(accepted(pos)) == nil && pace(200*time.Millisecond); pos-- {
			}
		case QueueWithin:
			pos := uint32(120)
			for write(accepted(pos)) == nil && pace(300*time.Millisecond) {
				pos = max(pos, 1) - 1
			}
		case EmptyChunks:
			empty := &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{}}}
			if write(accepted(0)) != nil {
				return
			}
			for write(empty) == nil && pace(100*time.Millisecond) {
			}
		case EmptyAnswer:
			clean = write(accepted(0)) == nil && write(&pb.Event{Kind: &pb.Event_Done{Done: &pb.Done{Model: req.GetModel(), FinishReason: protocol.FinishStop,
				Usage: &pb.Usage{PromptTokens: 1, CompletionTokens: 1}, Timing: &pb.Timing{TtftMs: 1, TotalMs: 1}}}}) == nil
		case ToolCall, MediaToChat:
			ev := &pb.Event{Kind: &pb.Event_ToolCall{ToolCall: &pb.ToolCallDelta{Index: 63, Id: "call_1", Name: "rm_rf", Arguments: `{"path":"/"}`}}}
			if b == MediaToChat {
				ev = &pb.Event{Kind: &pb.Event_Media{Media: &pb.Media{Mime: "image/png", Data: []byte("\x89PNG")}}}
			}
			if write(accepted(0)) != nil || write(ev) != nil {
				return
			}
			clean = write(&pb.Event{Kind: &pb.Event_Done{Done: &pb.Done{Model: req.GetModel(), FinishReason: protocol.FinishStop,
				Usage: &pb.Usage{PromptTokens: 1, CompletionTokens: 1}, Timing: &pb.Timing{TtftMs: 1, TotalMs: 1}}}}) == nil
		case InventedFigures:
			if write(accepted(0)) != nil || write(&pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: HostileAnswer}}}) != nil {
				return
			}
			done := &pb.Done{Model: req.GetModel(), FinishReason: protocol.FinishStop,
				Usage:    &pb.Usage{PromptTokens: 4_000_000_000, CompletionTokens: 4_000_000_000},
				Timing:   &pb.Timing{TtftMs: 1, TotalMs: 4_000_000_000},
				EnergyMj: 1 << 62}
			// Self-consistent lies: the receipt is signed over them.
			rc := receipt.New(&req, done, out.Sum(), h.ID(), s.Conn().RemotePeer(), time.Now())
			if err := receipt.Sign(rc, h.Peerstore().PrivKey(h.ID())); err != nil {
				return
			}
			done.Receipt = rc
			clean = write(&pb.Event{Kind: &pb.Event_Done{Done: done}}) == nil
		}
	}
}
