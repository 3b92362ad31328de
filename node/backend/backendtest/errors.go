package backendtest

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// ErrorCase is one answer of a backend's server and the typed error a query
// must end with.
type ErrorCase struct {
	Name   string
	Answer http.HandlerFunc
	Code   pb.ErrorCode
	Msg    string // part of the error's message: the server's own words, or why
}

// RunErrorCases runs each case as a subtest. query serves the case's answer
// from a fake server and returns the error of one query to it. That error
// must be typed with the case's code, retryable exactly when the server
// rather than the query failed, hold the case's Msg and not name the
// server's address.
func RunErrorCases(t *testing.T, cases []ErrorCase, query func(t *testing.T, answer http.HandlerFunc) error) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			pe := WantCode(t, query(t, c.Answer), c.Code)
			if want := workerFault(c.Code); pe.Retryable != want {
				t.Errorf("retryable %v, want %v", pe.Retryable, want)
			}
			if !strings.Contains(pe.Message, c.Msg) {
				t.Errorf("message %q lacks %q", pe.Message, c.Msg)
			}
			if strings.Contains(pe.Message, "127.0.0.1") {
				t.Errorf("message %q leaks the server address", pe.Message)
			}
		})
	}
}

// workerFault says whether a query that failed with code could succeed on
// another worker: only when this one is busy or broken, not when the query
// is at fault or ran out of time.
func workerFault(code pb.ErrorCode) bool {
	return code == protocol.CodeBusy || code == protocol.CodeBackendError
}

// CheckServerDown checks b, built for a server that is not there (DeadURL):
// the query req fails at once with a retryable BACKEND_ERROR saying the
// connection was refused, without the address, and so does Probe.
func CheckServerDown(t testing.TB, b backend.Backend, req *pb.QueryRequest) {
	t.Helper()
	_, err := b.Run(Context(t), req, &Sink{})
	pe := WantCode(t, err, protocol.CodeBackendError)
	if !pe.Retryable || !strings.Contains(pe.Message, "connection refused") {
		t.Errorf("%v: want a retryable refusal", pe)
	}
	if strings.Contains(pe.Message, "127.0.0.1") {
		t.Errorf("message %q leaks the server address", pe.Message)
	}
	WantCode(t, b.Probe(Context(t)), protocol.CodeBackendError)
}

// Serving builds the backend under test in front of a fake server that
// answers with h.
type Serving func(h http.HandlerFunc) backend.Backend

// CheckDeadline checks that req, to a server that never answers, ends with
// TIMEOUT when the query's own deadline passes.
func CheckDeadline(t testing.TB, serving Serving, req *pb.QueryRequest) {
	t.Helper()
	b := serving(Hang(nil))
	ctx, cancel := context.WithTimeout(Context(t), 100*time.Millisecond)
	defer cancel()
	_, err := b.Run(ctx, req, &Sink{})
	WantCode(t, err, protocol.CodeTimeout)
}

// CheckCancel checks that req, to a server that never answers, ends with
// CANCELLED when the query is cancelled once the server has it.
func CheckCancel(t testing.TB, serving Serving, req *pb.QueryRequest) {
	t.Helper()
	arrived := make(chan struct{}, 1)
	b := serving(Hang(arrived))
	ctx, cancel := context.WithCancel(Context(t))
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := b.Run(ctx, req, &Sink{})
		errc <- err
	}()
	select {
	case <-arrived:
	case <-time.After(30 * time.Second):
		t.Fatal("the server never received the query")
	}
	cancel()
	select {
	case err := <-errc:
		WantCode(t, err, protocol.CodeCancelled)
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}
