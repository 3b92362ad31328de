package ws

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/coder/websocket"
	"github.com/google/uuid"
	logging "github.com/ipfs/go-log/v2"
	"golang.org/x/time/rate"

	"github.com/mtor-swarm/mtor/bridge/internal/scrub"
)

// conn is one client. Its read loop runs on the HTTP handler's goroutine,
// the only goroutine an idle connection has: a writer goroutine runs only
// while messages are queued, a ping only when its timer fires, and each
// query runs on its own goroutine, at most maxQueries at a time. Thousands
// of idle connections thus cost a goroutine and a few KiB each.
type conn struct {
	s        *Server
	ws       *websocket.Conn
	key      string // the bridge queue's name for this user
	rawText  bool   // ?format=text: query_result text is sent as is, not HTML-escaped
	limiter  *rate.Limiter
	uploads  *uploads
	ctx      context.Context
	cancel   context.CancelFunc
	maxQueue atomic.Int64 // most bytes ever queued, for tests
	closing  sync.Once
	wg       sync.WaitGroup // query goroutines
	pinger   *time.Timer

	// The outbound queue: a slice that grows with what is queued and is
	// let go when drained, rather than a channel whose buffer of
	// sendBuffer slots each connection would hold all its life.
	qmu     sync.Mutex
	room    *sync.Cond // on qmu: a write ended, or the connection did
	outq    [][]byte
	queued  int64 // bytes in outq and being written
	writing bool  // a writer goroutine is running

	sem chan struct{} // running queries

	mu       sync.Mutex
	stopping bool // the server's Close stopped the queries: refuse more
	user     userInfo
	queries  map[string]*running
	waiting  int
	history  []historyEntry // newest last
}

type running struct {
	cancel        context.CancelFunc
	userCancelled atomic.Bool
	stopped       atomic.Bool // cancelled by the server's Close
}

const userGUIDCookie = "user_guid"

// guidFromCookie returns the user_guid cookie when it holds a UUID, else a
// new random one (as the seed: a returning browser keeps its identity).
func guidFromCookie(r *http.Request) string {
	if ck, err := r.Cookie(userGUIDCookie); err == nil {
		if u, err := uuid.Parse(ck.Value); err == nil && len(ck.Value) == 36 {
			return u.String()
		}
	}
	return uuid.NewString()
}

func newConn(s *Server, ws *websocket.Conn, guid string, rawText bool) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	c := &conn{
		s:       s,
		ws:      ws,
		key:     "ws:" + guid,
		rawText: rawText,
		limiter: rate.NewLimiter(rate.Limit(s.cfg.ratePerSec), s.cfg.rateBurst),
		ctx:     ctx,
		cancel:  cancel,
		sem:     make(chan struct{}, s.cfg.maxQueries),
		queries: map[string]*running{},
		user:    userInfo{GUID: guid, Nickname: "user_" + guid[:8]},
	}
	c.room = sync.NewCond(&c.qmu)
	context.AfterFunc(ctx, func() {
		c.qmu.Lock()
		c.room.Broadcast()
		c.qmu.Unlock()
	})
	c.uploads = newUploads(&s.cfg, func(id string) {
		c.sendError("TIMEOUT", fmt.Sprintf("vision upload %q timed out before all chunks arrived", id), "")
	})
	return c
}

func (c *conn) log() *logging.ZapEventLogger { return c.s.cfg.log }

// serve runs the connection until the client leaves or is dropped.
func (c *conn) serve() {
	defer c.finish()
	c.pinger = time.AfterFunc(c.s.cfg.pingInterval, c.ping)

	// The seed client calls its init() on user_info and builds its model
	// list from worker_update; it sets the cookie it is told to.
	c.send(setCookieMsg{Type: "set_cookie", Name: userGUIDCookie, Value: c.user.GUID})
	c.send(userInfoMsg{Type: "user_info", Data: c.userInfo()})
	cat := c.s.catalog()
	c.s.noteSignature(cat.signature())
	c.send(workerUpdateMsg{Type: "worker_update", Workers: cat.entries})

	dropped := 0
	for {
		// No context on the read: cancelling one makes the library drop the
		// connection without a close frame. A dead client is found by the
		// pinger, which closes the connection and so ends this read.
		typ, data, err := c.ws.Read(context.Background())
		if err != nil {
			if websocket.CloseStatus(err) == -1 && c.ctx.Err() == nil {
				c.log().Debugw("websocket read ended", "guid", c.user.GUID, "err", err)
			}
			return
		}
		if c.ctx.Err() != nil {
			return
		}
		if !c.limiter.Allow() {
			dropped++
			if dropped > max(c.s.cfg.rateBurst, 32) {
				c.shutdown(websocket.StatusPolicyViolation, "rate limit exceeded")
				return
			}
			c.sendError("RATE_LIMITED", "rate limit exceeded: message dropped, slow down", "")
			continue
		}
		dropped = 0
		if typ != websocket.MessageText {
			c.sendError("BAD_REQUEST", "binary messages are not supported; send JSON text", "")
			continue
		}
		c.handle(data)
	}
}

// finish cancels every query, waits for their goroutines and closes.
func (c *conn) finish() {
	c.cancel()
	c.pinger.Stop()
	c.wg.Wait()
	c.uploads.close()
	c.closing.Do(func() { c.ws.CloseNow() })
}

// stopQueries cancels every query of the connection, running or waiting
// for a slot, and waits until each has queued its error (UNAVAILABLE:
// jobError) and the queue is written, or ctx ends.
func (c *conn) stopQueries(ctx context.Context) {
	c.mu.Lock()
	c.stopping = true
	for _, r := range c.queries {
		r.stopped.Store(true)
		r.cancel()
	}
	c.mu.Unlock()
	ended := make(chan struct{})
	go func() {
		c.wg.Wait()
		close(ended)
	}()
	select {
	case <-ended:
	case <-ctx.Done():
		return
	}
	c.flushed(ctx)
}

// shutdown closes the connection from our side with a status and the close
// handshake (which the library bounds to a few seconds).
func (c *conn) shutdown(code websocket.StatusCode, reason string) {
	c.closing.Do(func() {
		c.log().Debugw("closing websocket", "guid", c.user.GUID, "code", code, "reason", reason)
		c.cancel()
		go c.ws.Close(code, reason)
	})
}

// drop disconnects a client that does not keep up, without a handshake.
func (c *conn) drop(reason string) {
	c.closing.Do(func() {
		c.log().Infow("dropping websocket client", "guid", c.user.GUID, "reason", reason)
		c.cancel()
		go c.ws.CloseNow()
	})
}

// send queues v for the client, waiting while its queue is full. The
// callers are this connection's own goroutines (its reader, its queries),
// so a client that reads slower than its answers come slows them, and
// with them the workers' streams, instead of losing messages; one that
// stops reading is dropped when a write times out. It reports whether v
// was queued: false when the client is gone.
func (c *conn) send(v any) bool {
	b, ok := c.marshal(v)
	return ok && c.enqueue(b, true)
}

// sendLatest queues v unless the queue is full, and never waits: for
// updates that a later one supersedes (the worker list, a place in the
// bridge's queue), sent from goroutines that serve every client.
func (c *conn) sendLatest(v any) bool {
	b, ok := c.marshal(v)
	return ok && c.enqueue(b, false)
}

func (c *conn) marshal(v any) ([]byte, bool) {
	if c.ctx.Err() != nil {
		return nil, false
	}
	// Error text may quote a worker's or the transport's error, and with
	// it a network address; none leaves the bridge.
	if e, ok := v.(errorMsg); ok {
		e.Message = scrub.Addresses(e.Message)
		v = e
	}
	b, err := json.Marshal(v)
	if err != nil {
		c.log().Warnw("marshal outbound message", "err", err)
		return nil, false
	}
	return b, true
}

// enqueue adds b to the queue, which holds at most sendBuffer messages and
// sendBufferBytes bytes (one larger message goes alone): with wait, once
// there is room; without, only if there is room now.
func (c *conn) enqueue(b []byte, wait bool) bool {
	n := int64(len(b))
	c.qmu.Lock()
	for c.ctx.Err() == nil && (len(c.outq) >= c.s.cfg.sendBuffer || (c.queued != 0 && c.queued+n > c.s.cfg.sendBufferBytes)) {
		if !wait {
			c.qmu.Unlock()
			return false
		}
		c.room.Wait()
	}
	if c.ctx.Err() != nil {
		c.qmu.Unlock()
		return false
	}
	c.outq = append(c.outq, b)
	c.queued += n
	if c.queued > c.maxQueue.Load() {
		c.maxQueue.Store(c.queued) // only written under qmu
	}
	start := !c.writing
	c.writing = true
	c.qmu.Unlock()
	if start {
		go c.writeOut()
	}
	return true
}

// flushed waits until everything queued for the client is written, the
// connection ends, or ctx does.
func (c *conn) flushed(ctx context.Context) {
	stop := context.AfterFunc(ctx, func() {
		c.qmu.Lock()
		c.room.Broadcast()
		c.qmu.Unlock()
	})
	defer stop()
	c.qmu.Lock()
	defer c.qmu.Unlock()
	for c.queued > 0 && c.ctx.Err() == nil && ctx.Err() == nil {
		c.room.Wait()
	}
}

// writeOut writes the queued messages in order and ends when the queue is
// empty (enqueue starts it again) or the connection is done.
func (c *conn) writeOut() {
	for {
		c.qmu.Lock()
		if len(c.outq) == 0 || c.ctx.Err() != nil {
			c.writing = false
			c.outq = nil // let the drained backing array go
			c.qmu.Unlock()
			return
		}
		b := c.outq[0]
		c.outq[0] = nil
		c.outq = c.outq[1:]
		c.qmu.Unlock()
		// Not derived from c.ctx: cancelling a write's context mid-way
		// drops the connection, which would cut a closing handshake.
		ctx, cancel := context.WithTimeout(context.Background(), c.s.cfg.writeTimeout)
		err := c.ws.Write(ctx, websocket.MessageText, b)
		cancel()
		c.qmu.Lock()
		c.queued -= int64(len(b))
		c.room.Broadcast()
		c.qmu.Unlock()
		if err != nil {
			c.drop(fmt.Sprintf("write: %v", err))
		}
	}
}

// ping sends a protocol ping (browsers answer them without script) when
// its timer fires; a client that does not answer within the interval is
// dropped.
func (c *conn) ping() {
	if c.ctx.Err() != nil {
		return
	}
	// Not derived from c.ctx, as for writes: see writeOut.
	ctx, cancel := context.WithTimeout(context.Background(), c.s.cfg.pingInterval)
	err := c.ws.Ping(ctx)
	cancel()
	if c.ctx.Err() != nil {
		return
	}
	if err != nil {
		c.drop(fmt.Sprintf("ping: %v", err))
		return
	}
	c.pinger.Reset(c.s.cfg.pingInterval)
}

func (c *conn) sendError(code, msg, queryID string) {
	c.send(errorMsg{Type: "error", Message: msg, Code: code, QueryID: queryID})
}

func (c *conn) userInfo() userInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.user
}

// handle dispatches one inbound message.
func (c *conn) handle(data []byte) {
	var m inbound
	if err := json.Unmarshal(data, &m); err != nil {
		c.sendError("BAD_REQUEST", "invalid message: "+jsonProblem(err), "")
		return
	}
	switch m.Type {
	case "ping":
		c.send(typeOnly{Type: "pong"})
	case "pong":
		// the seed client's heartbeat; nothing to do
	case "set_nickname":
		c.setNickname(m.Nickname)
	case "get_previous_queries":
		c.send(previousQueriesMsg{Type: "previous_queries", Data: c.previous()})
	case "submit_query":
		c.submit(&m)
	case "speech_to_text":
		c.speechToText(&m)
	case "text_to_speech":
		c.textToSpeech(&m)
	case "vision_chunk":
		c.visionChunk(&m)
	case "cancel":
		c.cancelQuery(m.QueryID)
	case "":
		c.sendError("BAD_REQUEST", "message has no type", "")
	default:
		// The seed's sysop messages land here too: the bridge has no remote
		// administration.
		c.sendError("BAD_REQUEST", "Unknown message type", "")
	}
}

// jsonProblem turns a decoding error into a short message for the client.
func jsonProblem(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("field %q must be %s, not %s", te.Field, te.Type.Kind(), te.Value)
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return "not valid JSON"
	}
	return err.Error()
}

const maxNickname = 32

func (c *conn) setNickname(n string) {
	n = strings.TrimSpace(n)
	if n == "" || utf8.RuneCountInString(n) > maxNickname || strings.IndexFunc(n, unicode.IsControl) >= 0 {
		c.sendError("BAD_REQUEST", fmt.Sprintf("nickname must be 1-%d characters without control characters", maxNickname), "")
		return
	}
	c.mu.Lock()
	c.user.Nickname = n
	c.mu.Unlock()
	c.send(userInfoMsg{Type: "user_info", Data: c.userInfo()})
}

// previous is this connection's answered queries, newest first.
func (c *conn) previous() []historyEntry {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]historyEntry, 0, len(c.history))
	for i := len(c.history) - 1; i >= 0; i-- {
		out = append(out, c.history[i])
	}
	return out
}

func (c *conn) record(e historyEntry, seconds, cost float64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.history = append(c.history, e)
	if len(c.history) > c.s.cfg.history {
		c.history = c.history[len(c.history)-c.s.cfg.history:]
	}
	c.user.QueryCount++
	c.user.TotalQueryTime += seconds
	c.user.TotalCost += cost
}
