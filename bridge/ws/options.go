package ws

import (
	"time"

	logging "github.com/ipfs/go-log/v2"
)

// Defaults for the options. They are sized for the seed's browser client: it
// sends vision images in base64 pieces of about 1 MB and a recorded voice
// query as one message.
const (
	DefaultMaxMessage      = 4 << 20 // one inbound message
	DefaultRatePerSec      = 20      // inbound messages per second per connection
	DefaultRateBurst       = 64      // the seed client sends all vision chunks at once
	DefaultSendBuffer      = 512     // outbound messages queued per connection
	DefaultSendBufferBytes = 32 << 20
	DefaultMaxVisionBytes  = 8 << 20 // base64 buffered per connection: ~6 MiB of image, fits a request frame
	DefaultMaxVisionChunks = 64
	DefaultMaxUploads      = 4 // vision uploads in progress per connection
	DefaultVisionTimeout   = time.Minute
	DefaultPingInterval    = 30 * time.Second
	DefaultWriteTimeout    = 15 * time.Second
	DefaultQueryTimeout    = 5 * time.Minute
	DefaultMaxQueries      = 4 // running at once per connection; as many more may wait
	DefaultMaxConnections  = 4096
	DefaultModelPoll       = 3 * time.Second
	DefaultHistory         = 10 // the seed shows the last 10 queries
	DefaultMaxAnswer       = 4 << 20
	DefaultRetryAfter      = 2 * time.Second // the retry hint of a BUSY that has none of its own
)

type config struct {
	origins         []string
	trustFwdHost    bool
	maxMessage      int64
	ratePerSec      float64
	rateBurst       int
	sendBuffer      int
	sendBufferBytes int64
	maxVisionBytes  int64
	maxVisionChunks int
	maxUploads      int
	visionTimeout   time.Duration
	pingInterval    time.Duration
	writeTimeout    time.Duration
	queryTimeout    time.Duration
	maxQueries      int
	maxConns        int
	modelPoll       time.Duration
	history         int
	maxAnswer       int
	retryAfter      time.Duration
	log             *logging.ZapEventLogger
}

func defaults() config {
	return config{
		maxMessage:      DefaultMaxMessage,
		ratePerSec:      DefaultRatePerSec,
		rateBurst:       DefaultRateBurst,
		sendBuffer:      DefaultSendBuffer,
		sendBufferBytes: DefaultSendBufferBytes,
		maxVisionBytes:  DefaultMaxVisionBytes,
		maxVisionChunks: DefaultMaxVisionChunks,
		maxUploads:      DefaultMaxUploads,
		visionTimeout:   DefaultVisionTimeout,
		pingInterval:    DefaultPingInterval,
		writeTimeout:    DefaultWriteTimeout,
		queryTimeout:    DefaultQueryTimeout,
		maxQueries:      DefaultMaxQueries,
		maxConns:        DefaultMaxConnections,
		modelPoll:       DefaultModelPoll,
		history:         DefaultHistory,
		maxAnswer:       DefaultMaxAnswer,
		retryAfter:      DefaultRetryAfter,
		log:             logging.Logger("mtor/bridge/ws"),
	}
}

// Option configures a Server. Options never fail: a value out of range
// (zero or negative) leaves the default in place.
type Option func(*config)

// WithAllowedOrigins lets pages from these origins open /ws. Same-origin
// pages are always allowed. A pattern is matched with path.Match against the
// Origin's host, or against scheme://host when it contains "://".
func WithAllowedOrigins(patterns []string) Option {
	return func(c *config) { c.origins = append(c.origins, patterns...) }
}

// WithTrustForwardedHost, when on, lets a page whose Origin names the
// request's X-Forwarded-Host open /ws as a same-origin page: behind a
// reverse proxy that rewrites Host, the bridge's own page would otherwise
// be refused. Turn it on only behind a proxy that sets the header.
func WithTrustForwardedHost(on bool) Option {
	return func(c *config) { c.trustFwdHost = on }
}

// WithMaxMessage bounds one inbound message; a larger one closes the
// connection with status 1009 (message too big).
func WithMaxMessage(n int64) Option {
	return func(c *config) {
		if n > 0 {
			c.maxMessage = n
		}
	}
}

// WithRateLimit sets the per-connection token bucket for inbound messages.
func WithRateLimit(perSec float64, burst int) Option {
	return func(c *config) {
		if perSec > 0 && burst > 0 {
			c.ratePerSec, c.rateBurst = perSec, burst
		}
	}
}

// WithSendBuffer bounds the outbound messages queued for one connection. A
// client that falls further behind is disconnected.
func WithSendBuffer(n int) Option {
	return func(c *config) {
		if n > 0 {
			c.sendBuffer = n
		}
	}
}

// WithSendBufferBytes bounds the bytes queued for one connection. One
// message larger than the bound is still sent when nothing else is queued.
func WithSendBufferBytes(n int64) Option {
	return func(c *config) {
		if n > 0 {
			c.sendBufferBytes = n
		}
	}
}

// WithMaxVisionBytes bounds the base64 image data buffered per connection
// while vision uploads are being reassembled.
func WithMaxVisionBytes(n int64) Option {
	return func(c *config) {
		if n > 0 {
			c.maxVisionBytes = n
		}
	}
}

// WithMaxVisionChunks bounds total_chunks of one vision upload.
func WithMaxVisionChunks(n int) Option {
	return func(c *config) {
		if n > 0 {
			c.maxVisionChunks = n
		}
	}
}

// WithVisionTimeout drops a vision upload whose chunks stop arriving.
func WithVisionTimeout(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.visionTimeout = d
		}
	}
}

// WithPingInterval sets how often the server pings each client; a client
// that does not answer within the interval is disconnected.
func WithPingInterval(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.pingInterval = d
		}
	}
}

// WithWriteTimeout bounds the write of one message; a client that does not
// take it in time is disconnected.
func WithWriteTimeout(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.writeTimeout = d
		}
	}
}

// WithQueryTimeout bounds one query, all its steps included.
func WithQueryTimeout(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.queryTimeout = d
		}
	}
}

// WithMaxQueries bounds the queries one connection runs at once; as many
// more may wait, further ones are refused.
func WithMaxQueries(n int) Option {
	return func(c *config) {
		if n > 0 {
			c.maxQueries = n
		}
	}
}

// WithMaxConnections bounds open WebSocket connections; more are refused
// with 503.
func WithMaxConnections(n int) Option {
	return func(c *config) {
		if n > 0 {
			c.maxConns = n
		}
	}
}

// WithModelPoll sets how often the swarm's models are checked for changes
// that are pushed to clients as worker_update.
func WithModelPoll(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.modelPoll = d
		}
	}
}

// WithLogger replaces the package logger.
func WithLogger(l *logging.ZapEventLogger) Option {
	return func(c *config) {
		if l != nil {
			c.log = l
		}
	}
}

// WithRetryAfter is the retry hint (retry_after) of a BUSY error that has
// none of its own, such as the connection's own query limit.
func WithRetryAfter(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.retryAfter = d
		}
	}
}
