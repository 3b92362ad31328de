package protocol

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
)

// MaxPendingFrames bounds the bytes a FrameWriter holds for its writer;
// Write blocks while more are pending (one larger frame is let through
// alone). Thousands of tokens' frames, and what the worker reserves per
// stream in the resource manager: a client that stops reading pins no
// more than that.
const MaxPendingFrames = 64 << 10

// ErrWriterClosed is returned by Write after Close.
var ErrWriterClosed = errors.New("frame writer closed")

// ErrEncode wraps Write's error for a message that cannot be framed (a
// string that is not UTF-8, a frame over its bound): the message is at
// fault, not the reader, and the writer goes on.
var ErrEncode = errors.New("event cannot be encoded")

// FrameWriter writes frames from a goroutine of its own, so that frames
// queued while a write is in the kernel go out together in the next
// Write: a stream whose reader is behind costs one write (one yamux frame,
// one syscall) per batch, not per token. Frames stay whole and separate on
// the wire: the batching is invisible to the reader.
type FrameWriter struct {
	w        io.Writer
	deadline func(time.Time) error
	timeout  time.Duration

	mu      sync.Mutex
	cond    *sync.Cond
	pending []byte
	spare   []byte
	err     error
	closed  bool
	running bool
	done    chan struct{}
	// held: what is pending waits for the next Write, at most until the
	// timer (see WriteSoon).
	held  bool
	timer *time.Timer
}

// NewFrameWriter writes to w with a deadline (set with deadline, when not
// nil) timeout ahead, so that a reader who stops reading fails the writes
// within timeout. The deadline moves only once half of it has passed (a
// stalled write fails between timeout/2 and timeout after it began): a
// deadline set per write re-armed a timer per batch of tokens.
func NewFrameWriter(w io.Writer, deadline func(time.Time) error, timeout time.Duration) *FrameWriter {
	fw := &FrameWriter{w: w, deadline: deadline, timeout: timeout, done: make(chan struct{})}
	fw.cond = sync.NewCond(&fw.mu)
	return fw
}

// Write queues m. It returns the error of an earlier write, if any: the
// reader is gone.
func (fw *FrameWriter) Write(m proto.Message) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	fw.release()
	return fw.queueLocked(m)
}

// WriteSoon queues m like Write, but holds it for at most wait for the
// next frame, so that the two leave in one write: a worker's Accepted
// waits for its first output, which an instant backend has ready in
// microseconds, and the answer costs one frame and syscall less. A
// frame queued behind others, or after Close, is not held.
func (fw *FrameWriter) WriteSoon(m proto.Message, wait time.Duration) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	hold := len(fw.pending) == 0 && !fw.held && wait > 0
	if err := fw.queueLocked(m); err != nil || !hold {
		return err
	}
	fw.held = true
	fw.timer = time.AfterFunc(wait, func() {
		fw.mu.Lock()
		defer fw.mu.Unlock()
		fw.release()
	})
	return nil
}

// release lets held frames go; fw.mu is held.
func (fw *FrameWriter) release() {
	if fw.held {
		fw.held = false
		fw.timer.Stop()
		fw.cond.Broadcast()
	}
}

func (fw *FrameWriter) queueLocked(m proto.Message) error {
	for fw.err == nil && !fw.closed && len(fw.pending) >= MaxPendingFrames {
		fw.cond.Wait()
	}
	if fw.err != nil {
		return fw.err
	}
	if fw.closed {
		return ErrWriterClosed
	}
	b, err := AppendFrame(fw.pending, m)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrEncode, err)
	}
	fw.pending = b
	if !fw.running {
		fw.running = true
		go fw.loop()
	}
	fw.cond.Broadcast()
	return nil
}

// Close writes what is queued, stops the writer and returns the first
// write error.
func (fw *FrameWriter) Close() error {
	fw.mu.Lock()
	fw.release()
	fw.closed = true
	running := fw.running
	fw.cond.Broadcast()
	fw.mu.Unlock()
	if running {
		<-fw.done
	}
	fw.mu.Lock()
	defer fw.mu.Unlock()
	return fw.err
}

func (fw *FrameWriter) loop() {
	defer close(fw.done)
	var deadline time.Time // the one in force
	fw.mu.Lock()
	defer fw.mu.Unlock()
	for {
		for (len(fw.pending) == 0 || fw.held) && !fw.closed {
			fw.cond.Wait()
		}
		if len(fw.pending) == 0 {
			return
		}
		buf := fw.pending
		fw.pending = fw.spare[:0]
		fw.mu.Unlock()
		if fw.deadline != nil {
			if now := time.Now(); now.Add(fw.timeout / 2).After(deadline) {
				deadline = now.Add(fw.timeout)
				_ = fw.deadline(deadline)
			}
		}
		_, err := fw.w.Write(buf)
		fw.mu.Lock()
		if cap(buf) <= MaxPendingFrames*2 {
			fw.spare = buf[:0]
		} else {
			// A media frame's buffer is not kept; nor is the old spare,
			// which pending took at the swap and may still be using:
			// handed out again, it would be both the next write's bytes
			// and the frames queued during that write.
			fw.spare = nil
		}
		if err != nil {
			fw.err = err
			fw.pending = nil
			fw.cond.Broadcast()
			return
		}
		fw.cond.Broadcast()
	}
}
