package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/mtor-swarm/mtor/node/ledger"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
)

const (
	// maxResponse bounds a non-streaming answer (the peer table of a big
	// swarm is the largest).
	maxResponse = 32 << 20
	// maxEventLine bounds one NDJSON line: the largest event frame in
	// base64 plus JSON.
	maxEventLine = protocol.MaxEventFrame*4/3 + 64<<10
	// defaultCallTimeout bounds the non-streaming calls when ctx has no
	// deadline of its own.
	defaultCallTimeout = 30 * time.Second
)

// ErrUnreachable wraps failures to reach the API at all, so that the CLI
// can say that the node is probably not running.
var ErrUnreachable = errors.New("control API unreachable")

// RefusedError is the API refusing a request before any query: a client it
// does not serve (403), or an endpoint it does not have (404).
type RefusedError struct {
	Status  int
	Code    string
	Message string
}

func (e *RefusedError) Error() string { return "control API refused the request: " + e.Message }

// Client talks to a node's control API.
type Client struct {
	base string
	addr string
	hc   *http.Client
	// slack is how long past a query's deadline the client waits for the
	// node's own answer (TIMEOUT) before giving up on the node.
	slack time.Duration
}

// querySlack: a node answers a query whose deadline passed at once; one
// that does not within this is stopped, or its machine gone.
const querySlack = 10 * time.Second

// NewClient returns a client for the API at addr (HOST:PORT, or a URL
// starting with http://).
func NewClient(addr string) *Client {
	base := addr
	if !strings.HasPrefix(base, "http://") && !strings.HasPrefix(base, "https://") {
		base = "http://" + base
	}
	return &Client{
		base:  strings.TrimRight(base, "/"),
		addr:  addr,
		slack: querySlack,
		hc: &http.Client{Transport: &http.Transport{
			Proxy:                 nil, // the API is local; never send it through a proxy
			DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			ResponseHeaderTimeout: 0, // a query's first event may wait in a queue
			MaxIdleConns:          4,
			IdleConnTimeout:       30 * time.Second,
		}},
	}
}

// Addr is the address the client was made for.
func (c *Client) Addr() string { return c.addr }

// ID returns the node's identity and join line.
func (c *Client) ID(ctx context.Context) (*IDInfo, error) {
	var v IDInfo
	if err := c.get(ctx, "/v1/id", &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// Peers returns the node's peer table.
func (c *Client) Peers(ctx context.Context) ([]Peer, error) {
	var v []Peer
	if err := c.get(ctx, "/v1/peers", &v); err != nil {
		return nil, err
	}
	return v, nil
}

// Models returns the models the swarm serves, as the node knows them.
func (c *Client) Models(ctx context.Context) ([]router.ModelView, error) {
	var v []router.ModelView
	if err := c.get(ctx, "/v1/models", &v); err != nil {
		return nil, err
	}
	return v, nil
}

// Ledger returns the node's ledger.
func (c *Client) Ledger(ctx context.Context) (*ledger.Snapshot, error) {
	var v ledger.Snapshot
	if err := c.get(ctx, "/v1/ledger", &v); err != nil {
		return nil, err
	}
	return &v, nil
}

// Query sends a query and calls onEvent for each streamed event (accepted,
// chunk, media, embedding). It returns the done event, or a
// *protocol.Error when the query failed, or an error wrapping
// ErrUnreachable when the API could not be reached. A non-nil return from
// onEvent, or ctx ending, cancels the query.
func (c *Client) Query(ctx context.Context, q *QueryRequest, onEvent func(*Event) error) (*DoneEvent, error) {
	body, err := json.Marshal(q)
	if err != nil {
		return nil, fmt.Errorf("encode query: %w", err)
	}
	// The node ends a query at its deadline and says so; this bound is
	// for a node that cannot (stopped, its machine gone): the query's own
	// timeout, else the most a node grants, and the slack.
	limit := MaxQueryTimeout
	if q.TimeoutMs > 0 {
		limit = time.Duration(q.TimeoutMs) * time.Millisecond
	}
	ctx, cancel := context.WithTimeoutCause(ctx, limit+c.slack, errNodeSilent)
	defer cancel() // closes the stream, which cancels the query at the node
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+"/v1/query", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := c.do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, readError(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), maxEventLine)
	sc.Split(scanEvents)
	for sc.Scan() {
		line := sc.Bytes()
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var ev Event
		if err := json.Unmarshal(line, &ev); err != nil {
			return nil, fmt.Errorf("control API sent a malformed event: %w", err)
		}
		switch ev.Event {
		case EventDone:
			if ev.DoneEvent == nil {
				return nil, errors.New("control API sent an empty done event")
			}
			return ev.DoneEvent, nil
		case EventError:
			if ev.ErrorEvent == nil {
				return nil, errors.New("control API sent an empty error event")
			}
			return nil, ev.ErrorEvent.ProtoError()
		}
		if onEvent != nil {
			if err := onEvent(&ev); err != nil {
				return nil, err
			}
		}
	}
	if err := sc.Err(); err != nil {
		if ctx.Err() != nil {
			return nil, ctxError(ctx)
		}
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, fmt.Errorf("the node at %s sent an event longer than %d bytes", c.base, maxEventLine)
		}
		return nil, fmt.Errorf("the node at %s cut the answer off (it stopped or died mid-answer); the answer is incomplete: %w", c.base, err)
	}
	if ctx.Err() != nil {
		return nil, ctxError(ctx)
	}
	return nil, fmt.Errorf("the node at %s ended the query stream without a result (it stopped or died mid-answer); the answer is incomplete", c.base)
}

func (c *Client) get(ctx context.Context, path string, v any) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultCallTimeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return readError(resp)
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxResponse)).Decode(v); err != nil {
		return fmt.Errorf("control API sent malformed JSON for %s: %w", path, err)
	}
	return nil
}

// errNodeSilent ends a query whose node said nothing past its deadline.
var errNodeSilent = errors.New("the node did not end the query by its deadline")

// ctxError types the end of a call's context.
func ctxError(ctx context.Context) error {
	if errors.Is(context.Cause(ctx), errNodeSilent) {
		return protocol.Errorf(protocol.CodeTimeout, "%v (is it stopped?)", errNodeSilent)
	}
	return protocol.AsError(ctx.Err())
}

func (c *Client) do(req *http.Request) (*http.Response, error) {
	resp, err := c.hc.Do(req)
	if err != nil {
		if req.Context().Err() != nil {
			return nil, ctxError(req.Context())
		}
		return nil, fmt.Errorf("%w at %s: %w", ErrUnreachable, c.addr, err)
	}
	return resp, nil
}

// readError turns a non-200 answer into a typed error.
func readError(resp *http.Response) error {
	var body ErrorBody
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err := json.Unmarshal(b, &body); err != nil || body.Error.Code == "" {
		return fmt.Errorf("control API answered %s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	switch body.Error.Code {
	case CodeForbidden, CodeNotFound:
		return &RefusedError{Status: resp.StatusCode, Code: body.Error.Code, Message: body.Error.Message}
	}
	return body.Error.ProtoError()
}

// scanEvents splits the stream into its events, one a line. Unlike
// bufio.ScanLines it does not hand out a last line without its newline:
// that is an event cut off by a node that stopped or died, an
// io.ErrUnexpectedEOF, not a malformed event.
func scanEvents(data []byte, atEOF bool) (int, []byte, error) {
	if i := bytes.IndexByte(data, '\n'); i >= 0 {
		return i + 1, data[:i], nil
	}
	if atEOF && len(data) > 0 {
		return 0, nil, io.ErrUnexpectedEOF
	}
	return 0, nil, nil
}
