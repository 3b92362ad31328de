package httputil

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/mtor-swarm/mtor/node/backend/backendtest"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func TestStatusError(t *testing.T) {
	for _, c := range []struct {
		status int
		code   pb.ErrorCode
	}{
		{400, protocol.CodeBadRequest}, {422, protocol.CodeBadRequest}, {409, protocol.CodeBadRequest},
		{401, protocol.CodeBackendError}, {403, protocol.CodeBackendError},
		{404, protocol.CodeUnsupported}, {405, protocol.CodeUnsupported}, {501, protocol.CodeUnsupported},
		{408, protocol.CodeTimeout}, {504, protocol.CodeTimeout},
		{413, protocol.CodeTooLarge},
		{429, protocol.CodeBusy}, {503, protocol.CodeBusy},
		{500, protocol.CodeBackendError}, {502, protocol.CodeBackendError},
	} {
		e := StatusError(c.status, []byte(`{"error":"why"}`))
		if e.Code != c.code || !strings.Contains(e.Message, "why") || !strings.Contains(e.Message, fmt.Sprint(c.status)) {
			t.Errorf("StatusError(%d) = %v, want %s quoting the status and message", c.status, e, protocol.CodeName(c.code))
		}
	}
}

func TestErrorMessage(t *testing.T) {
	for body, want := range map[string]string{
		`{"error":{"message":"openai style","type":"x"}}`: "openai style",
		`{"error":"ollama style"}`:                        "ollama style",
		`{"object":"error","message":"vllm style"}`:       "vllm style",
		`{"detail":"fastapi style"}`:                      "fastapi style",
		`{"detail":[{"loc":["body"],"msg":"missing"}]}`:   `[{"loc":["body"],"msg":"missing"}]`,
		"  plain text\n":                                  "plain text",
		"bad \xff utf8":                                   "bad \uFFFD utf8",
		// Python's http.server, a web server rather than a model server
		"<!DOCTYPE HTML>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">\n<title>Error response</title>\n</head><body><h1>Error response</h1><p>Error code: 404</p></body></html>\n": `an HTML page titled "Error response", not an API's error: is the URL the model server's API?`,
		"  <html><body>Not Found</body></html>":       "an HTML page, not an API's error: is the URL the model server's API?",
		"<HTML><TITLE>\n  502 Bad\n Gateway </TITLE>": `an HTML page titled "502 Bad Gateway", not an API's error: is the URL the model server's API?`,
		"<b>not a page</b>":                           "<b>not a page</b>",
	} {
		if got := ErrorMessage([]byte(body)); got != want {
			t.Errorf("ErrorMessage(%q) = %q, want %q", body, got, want)
		}
	}
	long := ErrorMessage([]byte(strings.Repeat("é", 2000)))
	if len(long) > MaxMessage+len("…") || !utf8.ValidString(long) {
		t.Errorf("long message clipped to %d bytes, valid %v", len(long), utf8.ValidString(long))
	}
}

func get(t *testing.T, url string) *http.Request { r, _ := NewGetRequest(url); return r }
func code(err error) pb.ErrorCode                { return protocol.AsError(err).Code }
func send(t *testing.T, url string, first, idle time.Duration) (*Exchange, error) {
	return Send(backendtest.Context(t), http.DefaultClient, get(t, url), first, idle)
}

func TestSendTextSplitsLongText(t *testing.T) {
	text := strings.Repeat("ab€", protocol.MaxChunkText) // 5 bytes a rune triple
	var c backendtest.Sink
	if err := SendText(&c, text); err != nil {
		t.Fatal(err)
	}
	if c.Text() != text || len(c.Chunks()) < 2 {
		t.Fatalf("%d chunks, joined equal %v", len(c.Chunks()), c.Text() == text)
	}
	for _, s := range c.Chunks() {
		if len(s) > protocol.MaxChunkText || !utf8.ValidString(s) {
			t.Fatalf("chunk of %d bytes, valid %v", len(s), utf8.ValidString(s))
		}
	}
}

func TestSSE(t *testing.T) {
	url := backendtest.Serve(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, ": comment\n\nevent: x\ndata: one\n\ndata:two\ndata: lines\r\n\r\nid: 3\n\n\ndata: cut off")
	})
	x, err := send(t, url, time.Minute, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	s := NewSSE(x, 1024)
	var got []string
	for {
		d, err := s.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, d)
	}
	if strings.Join(got, "|") != "one|two\nlines" {
		t.Fatalf("events %q", got)
	}
}

func TestSSEEventLimit(t *testing.T) {
	url := backendtest.Serve(t, func(w http.ResponseWriter, r *http.Request) {
		for range 20 {
			io.WriteString(w, "data: "+strings.Repeat("x", 100)+"\n")
		}
		io.WriteString(w, "\n")
	})
	x, err := send(t, url, time.Minute, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	if _, err := NewSSE(x, 1024).Next(); code(err) != protocol.CodeBackendError {
		t.Fatalf("an event of 2000 bytes under a 1024 limit: %v", err)
	}
}

// TestWatchdog: no headers within the first timeout, or a body that goes
// quiet longer than the idle timeout, end the exchange with BACKEND_ERROR.
func TestWatchdog(t *testing.T) {
	silent := backendtest.Serve(t, func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
	_, err := send(t, silent, 50*time.Millisecond, time.Hour)
	if pe := protocol.AsError(err); pe.Code != protocol.CodeBackendError || !strings.Contains(pe.Message, "nothing for 50ms") {
		t.Fatalf("silent server: %v", err)
	}

	quiet := backendtest.Serve(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "{}\n")
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	})
	x, err := send(t, quiet, time.Hour, 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	l := NewLines(x, 1024)
	if line, err := l.Next(); err != nil || string(line) != "{}" {
		t.Fatalf("first line %q, %v", line, err)
	}
	if _, err := l.Next(); code(err) != protocol.CodeBackendError {
		t.Fatalf("quiet stream: %v", err)
	}

	// Headers at once, then a wait for a queue slot (vLLM, llama.cpp):
	// the first bound covers it, the idle one starts with the first bytes.
	queued := backendtest.Serve(t, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		time.Sleep(300 * time.Millisecond)
		io.WriteString(w, "{}\n")
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	})
	x, err = send(t, queued, time.Hour, 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	l = NewLines(x, 1024)
	if line, err := l.Next(); err != nil || string(line) != "{}" {
		t.Fatalf("an answer that waited for its first bytes: %q, %v", line, err)
	}
	if _, err := l.Next(); code(err) != protocol.CodeBackendError {
		t.Fatalf("silence after the first bytes: %v", err)
	}
}

func TestReadAllLimit(t *testing.T) {
	url := backendtest.Serve(t, func(w http.ResponseWriter, r *http.Request) { w.Write(make([]byte, 2000)) })
	x, err := send(t, url, time.Minute, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	if _, err := ReadAll(x, 1000); code(err) != protocol.CodeTooLarge {
		t.Fatalf("2000 bytes under a 1000 limit: %v", err)
	}
}

// TestTransportErrorNamesNoAddress: the errors net/http returns quote the
// backend's URL, address or host name; a typed error must not, since it
// reaches clients.
func TestTransportErrorNamesNoAddress(t *testing.T) {
	const url, addr, host = "http://10.9.8.7:8000/predict", "10.9.8.7:8000", "gpu-box.lan"
	tcp := &net.TCPAddr{IP: net.IPv4(10, 9, 8, 7), Port: 8000}
	wrap := func(err error) error { return &neturl.Error{Op: "Post", URL: url, Err: err} }
	for _, c := range []struct {
		name string
		err  error
		code pb.ErrorCode
		msg  string
	}{
		{"refused", wrap(&net.OpError{Op: "dial", Net: "tcp", Addr: tcp, Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}), protocol.CodeBackendError, "connection refused"},
		{"reset", wrap(&net.OpError{Op: "read", Net: "tcp", Addr: tcp, Err: os.NewSyscallError("read", syscall.ECONNRESET)}), protocol.CodeBackendError, "mid-answer"},
		{"cut", wrap(io.ErrUnexpectedEOF), protocol.CodeBackendError, "mid-answer"},
		{"dns", wrap(&net.OpError{Op: "dial", Net: "tcp", Err: &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}}), protocol.CodeBackendError, "host not found"},
		{"timeout", wrap(&net.OpError{Op: "dial", Net: "tcp", Addr: tcp, Err: os.ErrDeadlineExceeded}), protocol.CodeTimeout, "timed out"},
		{"other", wrap(errors.New("tls: failed to verify certificate: x509: certificate is valid for " + host)), protocol.CodeBackendError, "failed"},
	} {
		e := TransportError(c.err)
		if e.Code != c.code || !strings.Contains(e.Message, c.msg) {
			t.Errorf("%s: %v, want %s saying %q", c.name, e, protocol.CodeName(c.code), c.msg)
		}
		for _, leak := range []string{addr, "10.9.8.7", host} {
			if strings.Contains(e.Message, leak) {
				t.Errorf("%s: message %q names %q", c.name, e.Message, leak)
			}
		}
	}
}

// TestRefusedNamesNoAddress goes through a real refused connection.
func TestRefusedNamesNoAddress(t *testing.T) {
	_, err := send(t, backendtest.DeadURL(t)+"/x", time.Minute, 0)
	pe := protocol.AsError(err)
	if pe.Code != protocol.CodeBackendError || !pe.Retryable || !strings.Contains(pe.Message, "connection refused") {
		t.Fatalf("refused: %v", err)
	}
	if strings.Contains(pe.Message, "127.0.0.1") {
		t.Fatalf("message %q names the address", pe.Message)
	}
}

func TestErrorMessageShapes(t *testing.T) {
	for body, want := range map[string]string{
		// A1111: "error" is only the exception's type name.
		`{"error":"OutOfMemoryError","detail":"","body":"","errors":"CUDA out of memory"}`: "CUDA out of memory",
		`{"error":"HTTPException","detail":"Sampler not found","body":"","errors":""}`:     "Sampler not found",
		`{"error":"HTTPException","detail":"","errors":""}`:                                "HTTPException",
		`{"error":true,"message":"flagged"}`:                                               "flagged",
		`{"error":{"code":7}}`:                                                             `{"code":7}`,
		"line one\n\tline two \x1b[31mred\x1b[0m":                                          "line one line two [31mred [0m",
	} {
		if got := ErrorMessage([]byte(body)); got != want {
			t.Errorf("ErrorMessage(%q) = %q, want %q", body, got, want)
		}
	}
}

// TestStatusOptions: PassStatus hands a status to the caller, MapStatus
// changes its code, both for Send and for Exchange.StatusError.
func TestStatusOptions(t *testing.T) {
	url := backendtest.Serve(t, func(w http.ResponseWriter, r *http.Request) {
		status, _ := strconv.Atoi(r.URL.Query().Get("s"))
		w.WriteHeader(status)
		io.WriteString(w, `{"detail":"why"}`)
	})
	x, err := send(t, url+"?s=404", time.Minute, 0)
	if code(err) != protocol.CodeUnsupported || x != nil {
		t.Fatalf("404 by default: %v", err)
	}
	x, err = Send(backendtest.Context(t), http.DefaultClient, get(t, url+"?s=404"), time.Minute, 0, PassStatus(404, 405))
	if err != nil || x.Resp.StatusCode != 404 {
		t.Fatalf("passed 404: %v", err)
	}
	if e := x.StatusError(); e.Code != protocol.CodeUnsupported || !strings.Contains(e.Message, "why") {
		t.Fatalf("passed 404 mapped: %v", e)
	}
	x.Close()
	_, err = Send(backendtest.Context(t), http.DefaultClient, get(t, url+"?s=503"), time.Minute, 0, MapStatus(503, protocol.CodeBackendError))
	if pe := protocol.AsError(err); pe.Code != protocol.CodeBackendError || !pe.Retryable || !strings.Contains(pe.Message, "why") {
		t.Fatalf("mapped 503: %v", err)
	}
	x, err = Send(backendtest.Context(t), http.DefaultClient, get(t, url+"?s=404"), time.Minute, 0, PassStatus(404), MapStatus(404, protocol.CodeBadRequest))
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	if e := x.StatusError(); e.Code != protocol.CodeBadRequest || e.Retryable {
		t.Fatalf("passed and mapped 404: %v", e)
	}
}

// pastDeadline is a context whose deadline has passed but whose own timer
// has not fired yet (Err still nil), as happens for a moment on a busy
// machine.
type pastDeadline struct{ context.Context }

func (pastDeadline) Deadline() (time.Time, bool) { return time.Now().Add(-time.Second), true }

func TestContextErrorPastDeadline(t *testing.T) {
	if e := ContextError(pastDeadline{context.Background()}); e == nil || e.Code != protocol.CodeTimeout {
		t.Fatalf("past deadline: %v", e)
	}
	if e := ContextError(context.Background()); e != nil {
		t.Fatalf("live: %v", e)
	}
}

// TestDeadlineBeatsWatchdog: when the query's deadline and the watchdog
// end at the same time, the client hears TIMEOUT, not BACKEND_ERROR.
func TestDeadlineBeatsWatchdog(t *testing.T) {
	silent := backendtest.Serve(t, func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
	for range 5 {
		c, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
		_, err := Send(c, http.DefaultClient, get(t, silent), 30*time.Millisecond, 0)
		cancel()
		if code(err) != protocol.CodeTimeout {
			t.Fatalf("deadline with the watchdog: %v", err)
		}
	}
}

func TestBaseURL(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"http://127.0.0.1:11434", "http://127.0.0.1:11434"},
		{" https://h:8080/ ", "https://h:8080"},
		{"http://h/v1//", "http://h/v1"},
		{"http://h/a%20b/", "http://h/a%20b"},
		{"", ""},
		{"127.0.0.1:7860", ""},
		{"ftp://h", ""},
		{"http://", ""},
		{"http://h/?q=1", ""},
		{"http://h/?", ""},
		{"http://h/#x", ""},
		{"http://h:port", ""},
	} {
		u, err := BaseURL(c.in)
		switch {
		case c.want == "" && err == nil:
			t.Errorf("BaseURL(%q) = %s, want an error", c.in, u)
		case c.want != "" && (err != nil || u.String() != c.want):
			t.Errorf("BaseURL(%q) = %v, %v; want %s", c.in, u, err, c.want)
		}
	}
}

// TestNoRedirects: the client returned does not follow a redirect, which
// reaches the caller as the 3xx response, and the caller's client is left
// following them.
func TestNoRedirects(t *testing.T) {
	url := backendtest.Serve(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/from" {
			http.Redirect(w, r, "/to", http.StatusTemporaryRedirect)
		}
	})
	own := &http.Client{Timeout: time.Minute}
	for _, c := range []struct {
		name   string
		client *http.Client
		want   int
	}{
		{"default", NoRedirects(nil), http.StatusTemporaryRedirect},
		{"given", NoRedirects(own), http.StatusTemporaryRedirect},
		{"caller's own", own, http.StatusOK},
	} {
		resp, err := c.client.Get(url + "/from")
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("%s client: status %d, want %d", c.name, resp.StatusCode, c.want)
		}
	}
	if NoRedirects(own).Timeout != time.Minute {
		t.Error("NoRedirects dropped the client's settings")
	}
}
