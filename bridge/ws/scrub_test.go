package ws_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/bridge/ws/wstest"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// leakyFailingSwarm is a fake: the demo swarm's peers and models, but every
// query fails with err, as a router does when a worker's stream breaks and
// the error text quotes the transport's addresses.
type leakyFailingSwarm struct {
	*wstest.DemoSwarm
	err error
}

func (s leakyFailingSwarm) Query(context.Context, *pb.QueryRequest, router.Handler) (*router.Result, error) {
	return nil, s.err
}

// leakyText holds every address form a worker or libp2p error may quote.
const leakyText = "stream to <peer.ID 12*KeV5Mm> failed: read tcp4 127.0.0.1:37053->127.0.0.1:38699: i/o timeout; " +
	"all dials failed: [/ip4/192.168.1.20/tcp/4001] dial backoff, /ip6/::1/udp/4001/quic-v1: refused, " +
	"dial tcp [::1]:4001: connect: refused, dial tcp6 [fe80::1%eth0]:4001, from 2001:db8::7; " +
	`backend: Post "http://10.0.0.5:11434/api/chat": EOF, ollama at localhost:11434 and gpu-3.lan:8000 down`

var leakPatterns = []*regexp.Regexp{
	regexp.MustCompile(`\d+\.\d+\.\d+\.\d+`),
	regexp.MustCompile(`/ip4/`),
	regexp.MustCompile(`/ip6/`),
	regexp.MustCompile(`\[::1\]:`),
	regexp.MustCompile(`:\d+`), // any :port
	regexp.MustCompile(`(?i)fe80|2001:db8|localhost|gpu-3\.lan`),
}

// TestErrorsCarryNoAddresses: whatever error text the swarm returns, the
// error messages a client gets name no address, on every query path.
func TestErrorsCarryNoAddresses(t *testing.T) {
	sw, err := wstest.New()
	if err != nil {
		t.Fatal(err)
	}
	img := base64.StdEncoding.EncodeToString(testPNG(t, 8, 8))
	audio := base64.StdEncoding.EncodeToString(webm)
	queries := []msg{
		submit("hello", "chat", "demo"),
		submit("a cat", "imagine", "demo"),
		{"type": "submit_query", "query": msg{"prompt": "what is it?", "query_type": "vision", "model_name": "demo", "image": img}},
		{"type": "submit_query", "query": msg{"prompt": "", "query_type": "speech", "model_name": "demo", "audio": audio}},
		{"type": "speech_to_text", "audio": audio},
		{"type": "text_to_speech", "text": "read this"},
	}
	errs := map[string]error{
		"plain":    fmt.Errorf("router: %w", errors.New(leakyText)),
		"backend":  protocol.Errorf(protocol.CodeBackendError, "%s", leakyText),
		"busy":     protocol.Errorf(protocol.CodeBusy, "%s", leakyText),
		"internal": protocol.Errorf(protocol.CodeInternal, "%s", leakyText),
	}
	for name, qerr := range errs {
		t.Run(name, func(t *testing.T) {
			c := newHarnessOn(t, leakyFailingSwarm{sw, qerr}).mustDial()
			c.hello()
			for _, q := range queries {
				c.send(q)
				e, before := c.until("error")
				text := e.str("message")
				if !strings.Contains(text, "stream to <peer.ID 12*KeV5Mm> failed") {
					t.Errorf("%v: message %q lost the error's own words", q, text)
				}
				var all []string
				for _, m := range append(before, e) {
					allStrings(map[string]any(m), &all)
				}
				for _, s := range all {
					for _, re := range leakPatterns {
						if loc := re.FindString(s); loc != "" {
							t.Errorf("%v: %q (matches %s) reached the client in %q", q, loc, re, s)
						}
					}
				}
			}
		})
	}
}
