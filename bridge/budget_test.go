package bridge

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// rawRequest writes a request's head, and body when not nil, on a new
// connection to base and returns the connection and a reader of its
// answers: a client that declares a body it does not send.
func rawRequest(t *testing.T, base, method, path, contentType string, contentLength int64, body []byte) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(testTimeout))
	head := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n",
		method, path, strings.TrimPrefix(base, "http://"), contentType, contentLength)
	if _, err := io.WriteString(conn, head); err != nil {
		t.Fatal(err)
	}
	if body != nil {
		if _, err := conn.Write(body); err != nil {
			t.Fatal(err)
		}
	}
	return conn, bufio.NewReader(conn)
}

// readAnswer reads one response and the code of its error body.
func readAnswer(t *testing.T, br *bufio.Reader) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	defer resp.Body.Close()
	var eb errorBody
	_ = json.NewDecoder(resp.Body).Decode(&eb)
	code := ""
	if eb.Error.Code != nil {
		code = *eb.Error.Code
	}
	return resp, code
}

// TestHugeDeclaredBodyRefusedUpFront: a Content-Length over the limit
// (10^12 bytes here) is refused with 413 from the headers alone, on every
// endpoint that takes a body: the client sends no byte of the body and
// still gets its answer.
func TestHugeDeclaredBodyRefusedUpFront(t *testing.T) {
	_, base := startBridge(t, &fakeSwarm{})
	for _, tc := range []struct{ path, contentType string }{
		{"/v1/chat/completions", "application/json"},
		{"/v1/embeddings", "application/json"},
		{"/v1/images/generations", "application/json"},
		{"/v1/audio/speech", "application/json"},
		{"/v1/audio/transcriptions", "multipart/form-data; boundary=x"},
	} {
		t.Run(tc.path, func(t *testing.T) {
			_, br := rawRequest(t, base, http.MethodPost, tc.path, tc.contentType, 1e12, nil)
			resp, code := readAnswer(t, br)
			if resp.StatusCode != http.StatusRequestEntityTooLarge || code != "request_too_large" {
				t.Fatalf("%d %s, want 413 request_too_large", resp.StatusCode, code)
			}
		})
	}
}

// TestReadAll: readAll returns what was sent, whatever the hint, ends in
// a buffer of exactly the declared size when the hint is exact, and holds
// a reservation of exactly its buffer's size.
func TestReadAll(t *testing.T) {
	for _, tc := range []struct {
		name       string
		size, hint int64
	}{
		{"empty", 0, 0},
		{"small, exact", 1000, 1000},
		{"large, exact", 3<<20 + 157, 3<<20 + 157},
		{"large, unknown", 3<<20 + 157, -1},
		{"more than the hint", 1 << 20, 100 << 10},
		{"less than the hint", 100 << 10, 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := make([]byte, tc.size)
			for i := range body {
				body[i] = byte(i)
			}
			res := &reservation{b: newBodyBudget(64<<20, time.Second)}
			// A reader that gives a few KiB at a time, as a network does.
			b, err := readAll(iotest.HalfReader(bytes.NewReader(body)), tc.hint, res)
			if err != nil || !bytes.Equal(b, body) {
				t.Fatalf("read %d bytes (%v), want the %d sent", len(b), err, len(body))
			}
			if tc.hint == tc.size && int64(cap(b)) != tc.size {
				t.Errorf("buffer of %d bytes for a body of exactly the %d declared", cap(b), tc.size)
			}
			if res.held != int64(cap(b)) {
				t.Errorf("reserved %d bytes for a buffer of %d", res.held, cap(b))
			}
			res.release()
		})
	}
}

// TestBodyBudget: the bridge holds at most WithMaxBodyInFlight bytes of
// request bodies at once, counted as they arrive. An upload that declared
// a large body but sent nothing holds 64 KiB, so stalled clients cannot
// lock others out for free; once uploads have sent the budget's worth, a
// body that does not fit is refused with 429 bridge_busy and Retry-After,
// whether its length is declared or not (chunked); when they end, their
// bytes are free again.
func TestBodyBudget(t *testing.T) {
	const limit = 1 << 20 // the body limit; the budget is 1.5 times it
	b, base := startBridge(t, newLocalSwarm(t), WithMaxBody(limit), WithMaxBodyInFlight(limit*3/2), WithRetryAfter(3*time.Second))
	chat := func(size int) string {
		b := `{"model":"demo","messages":[{"role":"user","content":"hi"}]}`
		return b + strings.Repeat(" ", size-len(b))
	}
	post := func(body io.Reader) (*http.Response, string) {
		t.Helper()
		req, err := http.NewRequest(http.MethodPost, base+"/v1/chat/completions", body)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var eb errorBody
		_ = json.NewDecoder(resp.Body).Decode(&eb)
		code := ""
		if eb.Error.Code != nil {
			code = *eb.Error.Code
		}
		return resp, code
	}
	// held waits until the bridge holds want bytes of bodies: it reads
	// the raw uploads' bytes on its own time, and gives a request's bytes
	// back just after its answer is out.
	held := func(want int64) {
		t.Helper()
		deadline := time.Now().Add(testTimeout)
		for b.bodies.inUse() != want {
			if time.Now().After(deadline) {
				t.Fatalf("the bridge holds %d bytes of bodies, want %d", b.bodies.inUse(), want)
			}
			time.Sleep(time.Millisecond)
		}
	}

	// Two uploads declare the largest body each and send nothing yet: they
	// hold 64 KiB each, and a largest body still fits beside them.
	slow, slowAnswer := rawRequest(t, base, http.MethodPost, "/v1/chat/completions", "application/json", limit, nil)
	other, _ := rawRequest(t, base, http.MethodPost, "/v1/chat/completions", "application/json", limit, nil)
	held(2 * firstRead)
	if resp, code := post(strings.NewReader(chat(limit))); resp.StatusCode != http.StatusOK {
		t.Fatalf("a largest body beside two that only declared theirs: %d %s, want 200", resp.StatusCode, code)
	}
	held(2 * firstRead)

	// One sends most of its body and holds 1 MiB: half a MiB no longer
	// fits beside it.
	if _, err := io.WriteString(slow, chat(limit)[:limit-100]); err != nil {
		t.Fatal(err)
	}
	held(limit + firstRead)
	for _, tc := range []struct {
		name string
		body io.Reader
	}{
		{"declared length", strings.NewReader(chat(limit / 2))},
		{"chunked", io.MultiReader(strings.NewReader(chat(limit / 2)))}, // no length known: sent chunked
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, code := post(tc.body)
			if resp.StatusCode != http.StatusTooManyRequests || code != "bridge_busy" || resp.Header.Get("Retry-After") != "3" {
				t.Fatalf("%d %s Retry-After %q, want 429 bridge_busy with Retry-After 3", resp.StatusCode, code, resp.Header.Get("Retry-After"))
			}
		})
	}

	// The upload ends and is answered; the other goes away; their bytes
	// are free again.
	if _, err := io.WriteString(slow, chat(limit)[limit-100:]); err != nil {
		t.Fatal(err)
	}
	if resp, code := readAnswer(t, slowAnswer); resp.StatusCode != http.StatusOK {
		t.Fatalf("the slow upload: %d %s, want 200", resp.StatusCode, code)
	}
	other.Close()
	held(0)
	if resp, code := post(strings.NewReader(chat(limit))); resp.StatusCode != http.StatusOK {
		t.Fatalf("after the uploads: %d %s, want 200", resp.StatusCode, code)
	}
}
