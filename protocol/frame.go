package protocol

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/multiformats/go-varint"
	"google.golang.org/protobuf/proto"
)

// Frame size limits. A frame is an unsigned varint length followed by that
// many bytes of protobuf. Readers reject a length above their limit before
// allocating anything.
const (
	// MaxRequestFrame bounds a QueryRequest, which may carry media
	// (images for vision, audio for speech-to-text).
	MaxRequestFrame = 8 << 20
	// MaxEventFrame bounds one Event; Media events are the large ones.
	MaxEventFrame = 8 << 20
	// MaxChunkText bounds the text of one Chunk event.
	MaxChunkText = 64 << 10
	// MaxAnnounce bounds an announcement on the gossip topic.
	MaxAnnounce = 16 << 10
	// MaxReceiptBatch bounds the receipts of one ReceiptBatch, and
	// MaxReceiptFrame its frame (a receipt is about 300 bytes).
	MaxReceiptBatch = 64
	MaxReceiptFrame = 64 << 10
)

// HeartbeatInterval is the longest silence a worker leaves on a query
// stream: it repeats Accepted (with the current queue position and this
// interval in heartbeat_ms) whenever it has sent nothing for this long. A
// client may treat 2.5 intervals of silence as a dead worker. A second is
// what makes a dead or frozen worker visible within 2.5 s; the cost is one
// 6-byte frame per second per silent stream.
const HeartbeatInterval = time.Second

// LegacyHeartbeat is the interval of workers whose Accepted carries no
// heartbeat_ms (before that field existed).
const LegacyHeartbeat = 5 * time.Second

// RequestTimeout is how long a worker waits for a query stream's request
// frame; a client that has not sent it whole by then gets TIMEOUT.
const RequestTimeout = 10 * time.Second

// ErrFrameTooLarge is wrapped by reads of a frame over the limit.
var ErrFrameTooLarge = errors.New("frame too large")

// ErrMalformedFrame is wrapped by reads of a bad varint or protobuf body.
var ErrMalformedFrame = errors.New("malformed frame")

// FrameReader reads length-delimited protobuf frames with a size limit.
type FrameReader struct {
	r       *bufio.Reader
	max     int
	buf     []byte
	reserve func(n int) error
}

// ErrNoMemory is wrapped by reads refused by the reserve callback.
var ErrNoMemory = errors.New("no memory for frame")

// SetReserve makes Read call f with the bytes a frame's body is to take
// before it takes them, so the caller can account for the memory (libp2p's
// resource manager) and refuse the frame: a small frame's length at once,
// a large one's (over 64 KiB) as its buffer grows with the bytes that
// arrive. So a peer that claims a large frame and sends little holds
// little of the budget it shares with every other peer, however many
// such claims it makes. The calls of one Read add up to the frame's
// length at most.
func (fr *FrameReader) SetReserve(f func(n int) error) { fr.reserve = f }

// NewFrameReader wraps r; frames longer than max bytes are refused.
func NewFrameReader(r io.Reader, max int) *FrameReader {
	if max < 0 {
		max = 0 // a negative limit would pass every length as uint64
	}
	return &FrameReader{r: bufio.NewReaderSize(r, readBuffer), max: max}
}

// readBuffer is a FrameReader's read-ahead: a batch of token events is a
// few hundred bytes, and larger bodies are read past it (readBody), so
// 4 KiB per stream (two streams per query) was mostly never used.
const readBuffer = 1 << 10

// Ready reports whether a whole frame is already read ahead: the next
// Read then returns without reading from the stream, and a caller need
// not re-arm a read deadline for it (the router reads a batch of events
// per stream read).
func (fr *FrameReader) Ready() bool {
	n := fr.r.Buffered()
	if n == 0 {
		return false
	}
	b, _ := fr.r.Peek(min(n, binary.MaxVarintLen64)) // buffered: never reads
	l, k := binary.Uvarint(b)
	return k > 0 && l <= uint64(n-k)
}

// IsTimeout reports whether err is a deadline's, on every transport
// (yamux's deadline error does not wrap os.ErrDeadlineExceeded, QUIC's
// does; both have Timeout).
func IsTimeout(err error) bool {
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}

// ErrBetweenFrames wraps a Read's error (a read deadline's, say) that
// came before any byte of the next frame: the reader is still in step
// with the stream, and a caller may Read again.
var ErrBetweenFrames = errors.New("no frame begun")

// Read reads the next frame into m. It returns io.EOF only on a clean end
// between frames; a frame cut short is io.ErrUnexpectedEOF. An error
// before the frame's first byte (other than the end) wraps
// ErrBetweenFrames; after it, the stream is out of step and done with.
func (fr *FrameReader) Read(m proto.Message) error {
	if _, err := fr.r.Peek(1); err != nil {
		if errors.Is(err, io.EOF) {
			return io.EOF
		}
		return fmt.Errorf("%w: %w", ErrBetweenFrames, err)
	}
	n, err := varint.ReadUvarint(fr.r)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return io.EOF
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return io.ErrUnexpectedEOF
		}
		// go-varint reports overflow and non-minimal encodings.
		if errors.Is(err, varint.ErrOverflow) || errors.Is(err, varint.ErrNotMinimal) {
			return fmt.Errorf("%w: bad length prefix: %v", ErrMalformedFrame, err)
		}
		return err
	}
	if n > uint64(fr.max) {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrFrameTooLarge, n, fr.max)
	}
	if fr.reserve != nil && n <= smallFrame {
		if err := fr.reserve(int(n)); err != nil {
			return fmt.Errorf("%w: %d bytes: %v", ErrNoMemory, n, err)
		}
	}
	buf, err := fr.readBody(int(n))
	if err != nil {
		return err
	}
	if err := proto.Unmarshal(buf, m); err != nil {
		return fmt.Errorf("%w: %v", ErrMalformedFrame, err)
	}
	return nil
}

// smallFrame is the size up to which frame bodies share one reused buffer,
// grown as needed.
const smallFrame = 64 << 10

// readBody reads an n-byte frame body. Small frames reuse one buffer (no
// aliasing: proto.Unmarshal copies bytes and strings). Large ones get a
// buffer that grows with the bytes actually received, so a peer that
// claims a large frame and then stalls pins about what it sent, not the
// claim; large buffers are dropped after use so one big frame does not pin
// memory for the life of the stream.
func (fr *FrameReader) readBody(n int) ([]byte, error) {
	var buf []byte
	if n <= smallFrame {
		if cap(fr.buf) < n {
			// Grown to what the frames need (a query stream's events are
			// mostly tens of bytes), not allocated at 64 KiB per stream.
			fr.buf = make([]byte, max(n, min(2*cap(fr.buf), smallFrame), 512))
		}
		buf = fr.buf[:0]
	} else {
		if err := fr.reserveLarge(n, smallFrame); err != nil {
			return nil, err
		}
		buf = make([]byte, 0, smallFrame)
	}
	for len(buf) < n {
		if len(buf) == cap(buf) {
			grow := min(len(buf), n-len(buf))
			if err := fr.reserveLarge(n, grow); err != nil {
				return nil, err
			}
			buf = slices.Grow(buf, grow)
			buf = buf[: len(buf) : len(buf)+grow] // as reserved, not as slices.Grow rounds
		}
		k, err := io.ReadFull(fr.r, buf[len(buf):min(cap(buf), n)])
		buf = buf[:len(buf)+k]
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	return buf, nil
}

// reserveLarge reserves k more bytes of a large frame of n bytes.
func (fr *FrameReader) reserveLarge(n, k int) error {
	if fr.reserve == nil {
		return nil
	}
	if err := fr.reserve(k); err != nil {
		return fmt.Errorf("%w: %d of a frame of %d bytes: %v", ErrNoMemory, k, n, err)
	}
	return nil
}

// AppendFrame appends the framed encoding of m to b.
func AppendFrame(b []byte, m proto.Message) ([]byte, error) {
	return appendFrame(b, m, proto.Size(m))
}

// appendFrame appends m, whose size was just computed (and cached in m by
// proto.Size), without sizing it again.
func appendFrame(b []byte, m proto.Message, size int) ([]byte, error) {
	var lp [varint.MaxLenUvarint63]byte
	b = append(b, lp[:varint.PutUvarint(lp[:], uint64(size))]...)
	b = slices.Grow(b, size)
	return proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(b, m)
}

// WriteFrame writes m as one frame with a single Write call, so that a
// frame is never interleaved or half-written by this side.
func WriteFrame(w io.Writer, m proto.Message) error {
	size := proto.Size(m)
	b, err := appendFrame(make([]byte, 0, size+varint.MaxLenUvarint63), m, size)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrEncode, err)
	}
	_, err = w.Write(b)
	return err
}
