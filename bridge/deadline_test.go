package bridge

import (
	"net/http/httptest"
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

// TestWriteDeadlineLifted: every response is written under a deadline that
// is lifted afterwards; a deadline left behind would cut the next response
// on the same kept-alive connection.
func TestWriteDeadlineLifted(t *testing.T) {
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
		n := len(rec.deadlines)
		if n < 2 || rec.deadlines[0].IsZero() || !rec.deadlines[n-1].IsZero() {
			t.Errorf("%s: deadlines %v, want set then lifted", body, rec.deadlines)
		}
		if rec.Code == 0 || rec.Body.Len() == 0 {
			t.Errorf("%s: no response", body)
		}
	}
}
