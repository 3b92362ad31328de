package bridge

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
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

// TestBodyBudget: the bridge holds at most WithMaxBodyInFlight bytes of
// request bodies at once. While one request holds most of the budget (its
// body declared, not yet sent), a body that does not fit is refused at
// once with 429 bridge_busy and Retry-After, whether its length is
// declared or not (chunked); one that fits is served; and once the first
// request ends, its bytes are free again.
func TestBodyBudget(t *testing.T) {
	_, base := startBridge(t, newLocalSwarm(t), WithMaxBody(1000), WithMaxBodyInFlight(1500), WithRetryAfter(3*time.Second))
	chat := func(size int) string {
		b := `{"model":"demo","messages":[{"role":"user","content":"hi"}]}`
		return b + strings.Repeat(" ", size-len(b))
	}
	post := func(body io.Reader) (*http.Response, string) {
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

	// A slow upload holds 1000 bytes: its head is in, its body is not.
	slow, slowAnswer := rawRequest(t, base, http.MethodPost, "/v1/chat/completions", "application/json", 1000, nil)

	for _, tc := range []struct {
		name string
		body io.Reader
	}{
		{"declared length", strings.NewReader(chat(600))},
		{"chunked", io.MultiReader(strings.NewReader(chat(600)))}, // no length known: sent chunked
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, code := post(tc.body)
			if resp.StatusCode != http.StatusTooManyRequests || code != "bridge_busy" || resp.Header.Get("Retry-After") != "3" {
				t.Fatalf("%d %s Retry-After %q, want 429 bridge_busy with Retry-After 3", resp.StatusCode, code, resp.Header.Get("Retry-After"))
			}
		})
	}
	if resp, code := post(strings.NewReader(chat(400))); resp.StatusCode != http.StatusOK {
		t.Fatalf("a body that fits: %d %s, want 200", resp.StatusCode, code)
	}

	// The slow upload ends; its answer comes; its bytes are free again.
	if _, err := io.WriteString(slow, chat(1000)); err != nil {
		t.Fatal(err)
	}
	if resp, code := readAnswer(t, slowAnswer); resp.StatusCode != http.StatusOK {
		t.Fatalf("the slow upload: %d %s, want 200", resp.StatusCode, code)
	}
	// The handler gives its bytes back just after its answer is out.
	deadline := time.Now().Add(testTimeout)
	for {
		resp, code := post(strings.NewReader(chat(600)))
		if resp.StatusCode == http.StatusOK {
			break
		}
		if resp.StatusCode != http.StatusTooManyRequests || time.Now().After(deadline) {
			t.Fatalf("after the slow upload: %d %s, want 200", resp.StatusCode, code)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
