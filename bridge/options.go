package bridge

import (
	"bufio"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mtor-swarm/mtor/bridge/internal/queue"
	"github.com/mtor-swarm/mtor/bridge/ws"
	"github.com/mtor-swarm/mtor/node/api/hostcheck"
)

// Defaults for the options.
const (
	DefaultMaxBody       = 16 << 20 // whole request body, media included
	DefaultMaxMedia      = 7 << 20  // decoded media per request; the request frame is 8 MiB
	DefaultQueryTimeout  = 5 * time.Minute
	DefaultRetryAfter    = 2 * time.Second
	DefaultShutdownGrace = 10 * time.Second
	defaultBodyTimeout   = time.Minute      // reading one request body
	defaultWriteTimeout  = 30 * time.Second // writing one SSE event or response
	maxKeyFile           = 1 << 20

	// DefaultQueue is how many queries may wait at the bridge for a slot in
	// the swarm, DefaultQueuePerClient how many of them one client (API
	// key, IP address or WebSocket user) may have waiting.
	DefaultQueue          = queue.DefaultMaxWaiting
	DefaultQueuePerClient = queue.DefaultMaxWaitingPerClient
	// DefaultQueueWait is the longest a query waits for a slot before it
	// is refused as busy.
	DefaultQueueWait = queue.DefaultMaxWait
)

// Defaults of the memory bounds.
const (
	// DefaultMaxBodyInFlight bounds the request-body bytes of all requests
	// at once: four bodies of the largest size.
	DefaultMaxBodyInFlight = 4 * DefaultMaxBody
	// DefaultMaxAnswer bounds a non-streamed text answer the bridge
	// gathers before it answers; a model's longest answers (128k tokens)
	// are well under 1 MiB of text.
	DefaultMaxAnswer = 4 << 20
)

type config struct {
	keys          []string
	corsOrigins   []string
	trustFwdHost  bool
	hosts         []string
	maxBody       int64
	maxMedia      int64
	maxBodyFlight int64 // request-body bytes of all requests at once
	maxAnswer     int   // bytes of a non-streamed answer
	registry      *prometheus.Registry
	queryTimeout  time.Duration
	keepAlive     time.Duration // SSE comment after this much silence
	retryAfter    time.Duration
	shutdownGrace time.Duration
	bodyTimeout   time.Duration // reading one request body (tests shorten it)
	selfID        string
	ledger        Ledger
	queue         int
	queuePerCl    int
	queueWait     time.Duration
	maxInFlight   int // 0: the swarm's capacity
	queueUpdate   time.Duration
	wsOpts        []ws.Option
	log           *logging.ZapEventLogger
}

// Option configures a Server.
type Option func(*config) error

// WithAPIKeys requires one of keys as "Authorization: Bearer <key>" on /v1/*
// and /ws. Without keys (the default) the API is open.
func WithAPIKeys(keys []string) Option {
	return func(c *config) error {
		for i, k := range keys {
			if k == "" || strings.ContainsAny(k, " \t\r\n") {
				return fmt.Errorf("api key %d: empty or contains white space", i)
			}
		}
		c.keys = append(c.keys, keys...)
		return nil
	}
}

// WithAPIKeyFile reads API keys from path, one a line; blank lines and lines
// starting with # are skipped. A file without keys is an error, so that a
// mistake never leaves the API open by accident.
func WithAPIKeyFile(path string) Option {
	return func(c *config) error {
		f, err := os.Open(path)
		if err != nil {
			return fmt.Errorf("api key file: %w", err)
		}
		defer f.Close()
		var keys []string
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 4096), maxKeyFile)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			keys = append(keys, line)
		}
		if err := sc.Err(); err != nil {
			return fmt.Errorf("api key file %s: %w", path, err)
		}
		if len(keys) == 0 {
			return fmt.Errorf("api key file %s holds no keys", path)
		}
		return WithAPIKeys(keys)(c)
	}
}

// WithCORSOrigins allows cross-origin browser requests from these origins
// (scheme://host[:port]); "*" allows any. Same-origin requests are always
// allowed; requests from any other origin get 403.
func WithCORSOrigins(origins []string) Option {
	return func(c *config) error {
		for _, o := range origins {
			if o == "*" {
				continue
			}
			u, err := url.Parse(o)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
				return fmt.Errorf("CORS origin %q: want scheme://host[:port] or *", o)
			}
		}
		c.corsOrigins = append(c.corsOrigins, origins...)
		return nil
	}
}

// WithTrustForwardedHost, when on, also takes the request's
// X-Forwarded-Host as the bridge's own host in the same-origin check of the
// API and /ws: behind a reverse proxy that rewrites Host, the bridge's own
// page sends the public host as its Origin and would otherwise get 403.
// Turn it on only behind a proxy that sets the header. Off by default.
func WithTrustForwardedHost(on bool) Option {
	return func(c *config) error {
		c.trustFwdHost = on
		return nil
	}
}

// WithAllowedHosts adds host names (host or host:port; the port is
// ignored) that a bridge without API keys answers to, besides localhost,
// loopback addresses and the address a connection arrived on. Any other
// Host gets 403 host_not_allowed, so that a DNS rebinding page cannot use
// the bridge from a user's browser. "*" allows every name. With API keys
// the check is off: keys protect the API whatever the Host.
func WithAllowedHosts(names ...string) Option {
	return func(c *config) error {
		if _, err := hostcheck.New(names...); err != nil {
			return err
		}
		c.hosts = append(c.hosts, names...)
		return nil
	}
}

// WithMaxBody bounds every request body (JSON or multipart, media
// included); larger ones get 413.
func WithMaxBody(n int64) Option {
	return func(c *config) error {
		if n <= 0 {
			return fmt.Errorf("max body %d must be > 0", n)
		}
		c.maxBody = n
		return nil
	}
}

// WithMaxBodyInFlight bounds the request-body bytes that all requests hold
// at once (JSON and multipart bodies, counted from their Content-Length or
// as they arrive). A request whose body does not fit gets 429 bridge_busy
// with Retry-After before its body is read. It is raised to the body limit
// when lower, so that one largest body always fits.
func WithMaxBodyInFlight(n int64) Option {
	return func(c *config) error {
		if n <= 0 {
			return fmt.Errorf("max body in flight %d must be > 0", n)
		}
		c.maxBodyFlight = n
		return nil
	}
}

// WithMaxAnswer bounds a non-streamed text answer (chat without stream,
// transcription) that the bridge gathers before it answers; a longer one
// is cut off and the client gets 502 response_too_large. Streamed answers
// are not gathered and not bounded by it.
func WithMaxAnswer(n int) Option {
	return func(c *config) error {
		if n <= 0 {
			return fmt.Errorf("max answer %d must be > 0", n)
		}
		c.maxAnswer = n
		return nil
	}
}

// WithMaxMedia bounds the decoded media (images, audio) of one request;
// more gets 413.
func WithMaxMedia(n int64) Option {
	return func(c *config) error {
		if n <= 0 {
			return fmt.Errorf("max media %d must be > 0", n)
		}
		c.maxMedia = n
		return nil
	}
}

// WithRegistry registers the bridge's metrics (and the Go and process
// collectors, unless already there) in reg instead of a registry of its own.
func WithRegistry(reg *prometheus.Registry) Option {
	return func(c *config) error {
		if reg == nil {
			return errors.New("nil registry")
		}
		c.registry = reg
		return nil
	}
}

// WithQueryTimeout bounds each query from request to last event.
func WithQueryTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("query timeout %s must be > 0", d)
		}
		c.queryTimeout = d
		return nil
	}
}

// WithRetryAfter is the Retry-After a client gets when the swarm is busy.
func WithRetryAfter(d time.Duration) Option {
	return func(c *config) error {
		if d < time.Second {
			return fmt.Errorf("retry-after %s must be at least 1s", d)
		}
		c.retryAfter = d
		return nil
	}
}

// WithShutdownGrace is how long Serve waits for requests in flight when its
// context ends before it cancels them.
func WithShutdownGrace(d time.Duration) Option {
	return func(c *config) error {
		if d < 0 {
			return fmt.Errorf("shutdown grace %s must be >= 0", d)
		}
		c.shutdownGrace = d
		return nil
	}
}

// WithLedger shows this node's ledger (work consumed from and served to
// each peer) in /api/swarm and so on the web page.
func WithLedger(l Ledger) Option {
	return func(c *config) error {
		c.ledger = l
		return nil
	}
}

// WithSelfID is this node's peer ID as /api/swarm reports it under "self".
// Without it, the peer the swarm marks Self is used, if any.
func WithSelfID(id string) Option {
	return func(c *config) error {
		c.selfID = id
		return nil
	}
}

// WithWSOptions passes options to the WebSocket server (package bridge/ws).
// Its allowed origins, X-Forwarded-Host trust and query timeout already
// follow the bridge's.
func WithWSOptions(opts ...ws.Option) Option {
	return func(c *config) error {
		c.wsOpts = append(c.wsOpts, opts...)
		return nil
	}
}

// WithLogger replaces the "mtor/bridge" logger.
func WithLogger(l *logging.ZapEventLogger) Option {
	return func(c *config) error {
		if l == nil {
			return errors.New("nil logger")
		}
		c.log = l
		return nil
	}
}

// WithKeepAlive sets how long a stream may stay silent before the bridge
// sends an SSE keep-alive comment (default DefaultKeepAlive).
func WithKeepAlive(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("keep-alive %s: must be positive", d)
		}
		c.keepAlive = d
		return nil
	}
}

// WithQueue bounds the queries waiting at the bridge for a slot in the
// swarm (default DefaultQueue); beyond it a query is refused at once as
// busy (429 with Retry-After). 0 refuses every query that finds the swarm
// at capacity.
func WithQueue(n int) Option {
	return func(c *config) error {
		if n < 0 {
			return fmt.Errorf("queue %d must be >= 0", n)
		}
		c.queue = n
		return nil
	}
}

// WithQueuePerClient bounds the queries one client has waiting (default
// DefaultQueuePerClient). A client is an API key when the bridge has keys,
// else an IP address; a WebSocket user (its user_guid) for /ws.
func WithQueuePerClient(n int) Option {
	return func(c *config) error {
		if n <= 0 {
			return fmt.Errorf("queue per client %d must be > 0", n)
		}
		c.queuePerCl = n
		return nil
	}
}

// WithQueueWait bounds how long a query waits for a slot (default
// DefaultQueueWait); then it is refused as busy.
func WithQueueWait(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("queue wait %s must be > 0", d)
		}
		c.queueWait = d
		return nil
	}
}

// WithMaxInFlight bounds the queries the bridge runs in the swarm at once.
// 0 (the default) follows the swarm: the sum of the concurrency its
// available workers announce.
func WithMaxInFlight(n int) Option {
	return func(c *config) error {
		if n < 0 {
			return fmt.Errorf("max in flight %d must be >= 0", n)
		}
		c.maxInFlight = n
		return nil
	}
}

// WithQueueUpdates sets how often waiting WebSocket queries are told their
// new position (queue_update); default 1 s.
func WithQueueUpdates(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("queue update interval %s must be > 0", d)
		}
		c.queueUpdate = d
		return nil
	}
}
