package httputil

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"unicode/utf8"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/protocol"
)

// Lines reads newline-delimited records (NDJSON) of at most max bytes each
// from the exchange's body, skipping blank lines.
type Lines struct {
	x  *Exchange
	sc *bufio.Scanner
}

// NewLines reads lines from x's body.
func NewLines(x *Exchange, max int) *Lines {
	sc := bufio.NewScanner(x.Body())
	sc.Buffer(make([]byte, 0, 1024), max) // an event is a few hundred bytes; the scanner grows to longer ones
	return &Lines{x: x, sc: sc}
}

// Next returns the next non-blank line (valid until the next call), or
// io.EOF at the end of the body, or a typed error.
func (l *Lines) Next() ([]byte, error) {
	for l.sc.Scan() {
		line := bytes.TrimSpace(l.sc.Bytes())
		if len(line) > 0 {
			return line, nil
		}
	}
	return nil, l.err()
}

func (l *Lines) err() error {
	err := l.sc.Err()
	switch {
	case err == nil:
		return io.EOF
	case errors.Is(err, bufio.ErrTooLong):
		return Malformed("a line longer than the limit")
	}
	return l.x.Err(err)
}

// SSE reads server-sent events (the text/event-stream format) from the
// exchange's body: "data:" lines are joined with "\n", a blank line ends an
// event, comments (":") and other fields are skipped. An event's data is
// bounded by the line limit.
type SSE struct {
	l    *Lines
	sc   *bufio.Scanner
	data []byte // reused from event to event
	max  int
}

// NewSSE reads events of at most max bytes from x's body.
func NewSSE(x *Exchange, max int) *SSE {
	sc := bufio.NewScanner(x.Body())
	sc.Buffer(make([]byte, 0, 1024), max) // an event is a few hundred bytes; the scanner grows to longer ones
	return &SSE{l: &Lines{x: x, sc: sc}, sc: sc, max: max}
}

// Next returns the data of the next event, io.EOF at the end of the body
// (an event cut off by the end is dropped, as the format says), or a typed
// error.
func (s *SSE) Next() (string, error) {
	b, err := s.NextBytes()
	return string(b), err
}

// NextBytes is Next without a copy: the data is valid until the next
// call. A backend decoding each event's JSON saves an allocation and a
// copy per token.
func (s *SSE) NextBytes() ([]byte, error) {
	s.data = s.data[:0]
	has := false
	for s.sc.Scan() {
		line := bytes.TrimSuffix(s.sc.Bytes(), []byte("\r"))
		if len(line) == 0 {
			if has {
				return s.data, nil
			}
			continue
		}
		field, value, _ := bytes.Cut(line, []byte(":"))
		if string(field) != "data" {
			continue // comment, event, id, retry
		}
		value = bytes.TrimPrefix(value, []byte(" "))
		if has {
			s.data = append(s.data, '\n')
		}
		if len(s.data)+len(value) > s.max {
			return nil, Malformed("an event larger than the limit")
		}
		s.data = append(s.data, value...)
		has = true
	}
	return nil, s.l.err()
}

// SendText streams text to out as Chunk events, splitting it at rune
// boundaries so that no chunk exceeds the protocol's limit.
func SendText(out backend.Sink, text string) error {
	for len(text) > protocol.MaxChunkText {
		cut := protocol.MaxChunkText
		for cut > 0 && !utf8.RuneStart(text[cut]) {
			cut--
		}
		if err := out.Chunk(text[:cut]); err != nil {
			return err
		}
		text = text[cut:]
	}
	if text == "" {
		return nil
	}
	return out.Chunk(text)
}
