package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/swarmtest"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// inPieces wraps a node's router as a fake of a worker (not one of this
// tree's) that sends its speech in three Media pieces, as docs/protocol.md
// §5.1 lets it; it keeps the whole audio the worker made.
type inPieces struct {
	*router.Router
	mu    sync.Mutex
	whole []byte
}

func (p *inPieces) Query(ctx context.Context, req *pb.QueryRequest, h router.Handler) (*router.Result, error) {
	return p.Router.Query(ctx, req, func(ev *pb.Event) error {
		m := ev.GetMedia()
		if m == nil {
			return h(ev)
		}
		p.mu.Lock()
		p.whole = bytes.Clone(m.GetData())
		p.mu.Unlock()
		d, third := m.GetData(), len(m.GetData())/3
		for _, piece := range [][]byte{d[:third], d[third : 2*third], d[2*third:]} {
			if err := h(&pb.Event{Kind: &pb.Event_Media{Media: &pb.Media{Mime: m.GetMime(), Data: piece}}}); err != nil {
				return err
			}
		}
		return nil
	})
}

// mtor query --type tts writes the whole audio to --out, and --json holds
// it as one media item, when the worker sends it in pieces.
func TestQuerySpeechInPieces(t *testing.T) {
	s := swarmtest.New(t, swarmtest.Workers(1), swarmtest.DemoDelay(0))
	split := &inPieces{Router: s.Bootstrap.Router()}
	addr := serveAPI(t, s.Bootstrap, split)
	out := filepath.Join(t.TempDir(), "speech.wav")

	code, _, stderr := runCLI(t, "query", "--api", addr, "--type", "tts", "--model", "demo", "--out", out, "read this aloud")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	split.mu.Lock()
	whole := split.whole
	split.mu.Unlock()
	if len(whole) < 3 || !bytes.Equal(got, whole) {
		t.Fatalf("--out holds %d bytes, want the whole audio of %d bytes", len(got), len(whole))
	}
	if !strings.Contains(stderr, "audio/wav, ") {
		t.Fatalf("stderr %q does not describe the audio", stderr)
	}

	code, stdout, stderr := runCLI(t, "query", "--api", addr, "--type", "tts", "--model", "demo", "--json", "read this aloud")
	ans := queryAnswer(t, "query --json", code, stdout, stderr)
	if len(ans.Media) != 1 || !bytes.Equal(ans.Media[0].Data, whole) {
		t.Fatalf("--json media: %d items; want one, the whole audio", len(ans.Media))
	}
}
