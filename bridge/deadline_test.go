package bridge

import (
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"
)

// deadlineRecorder records the write deadlines a handler sets.
type deadlineRecorder struct {
	*httptest.ResponseRecorder
	deadlines []time.Time
}

func (d *deadlineRecorder) SetWriteDeadline(t time.Time) error {
	d.deadlines = append(d.deadlines, t)
	return nil
}

// TestWriteDeadlines: every response is written under a deadline, what
// net/http writes after the handler too (writeDeadlines), and each request
// starts by lifting the deadline the one before it on the connection left,
// which would otherwise cut its response.
func TestWriteDeadlines(t *testing.T) {
	b, err := New(&fakeSwarm{events: []*pbEvent{accepted(), chunk("a "), chunk("b")}})
	if err != nil {
		t.Fatal(err)
	}
	for _, body := range []string{
		`{"model":"demo","messages":[{"role":"user","content":"x"}]}`,
		`{"model":"demo","messages":[{"role":"user","content":"x"}],"stream":true}`,
		`{"model":"nope","messages":[{"role":"user","content":"x"}]}`,
	} {
		rec := &deadlineRecorder{ResponseRecorder: httptest.NewRecorder()}
		req := httptest.NewRequest("POST", "/v1/chat/completions", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		b.Handler().ServeHTTP(rec, req)
		d := rec.deadlines
		if len(d) < 3 || !d[0].IsZero() || slices.ContainsFunc(d[1:], time.Time.IsZero) {
			t.Errorf("%s: deadlines %v, want lifted, then set for every write and for the end", body, d)
		}
		if rec.Code == 0 || rec.Body.Len() == 0 {
			t.Errorf("%s: no response", body)
		}
	}
}
