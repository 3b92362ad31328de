package node

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"
)

type opaqueErr struct{ msg string }

func (e *opaqueErr) Error() string { return e.msg }

// An error logged through slog shows its message, not "{}".
func TestErrorTextLogsTheMessage(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(ErrorText(slog.NewJSONHandler(&buf, nil)))
	log.With("peer_err", &opaqueErr{"dial refused"}).Error("failed", "err", errors.Join(&opaqueErr{"reservation refused"}))
	out := buf.String()
	if !strings.Contains(out, `"err":"reservation refused"`) || !strings.Contains(out, `"peer_err":"dial refused"`) {
		t.Fatalf("log line %s: want the error messages", out)
	}
}
