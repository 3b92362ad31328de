package node

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/protocol"
)

func TestBackendStateLines(t *testing.T) {
	for _, tc := range []struct {
		st   BackendState
		want string
	}{
		{BackendState{Name: "ollama http://h", State: BackendUp, Models: []string{}}, "ollama http://h up: no models (the server lists none)"},
		{BackendState{Name: "ollama http://h", State: BackendUp, Models: []string{"a"}}, "ollama http://h up: 1 model (a)"},
		{BackendState{Name: "ollama http://h", State: BackendUp, Models: []string{"a", "b", "c"}}, "ollama http://h up: 3 models (a, b, c)"},
		{BackendState{Name: "ollama http://h", State: BackendUp, Models: []string{"a", "b", "c", "d", "e"}}, "ollama http://h up: 5 models"},
		{BackendState{Name: "ollama http://h", State: BackendDown, Detail: "unreachable (connection refused)"}, "ollama http://h unreachable (connection refused)"},
		{BackendState{Name: "demo", State: BackendStarting}, "demo starting"},
	} {
		if got := tc.st.String(); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.st, got, tc.want)
		}
	}
}

func TestDescribeBackendError(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{protocol.Errorf(protocol.CodeBackendError, "backend unreachable: connection refused"), "unreachable (connection refused)"},
		{protocol.Errorf(protocol.CodeBackendError, "backend answered 500: boom"), "failing (answered 500: boom)"},
		{protocol.Errorf(protocol.CodeTimeout, "backend timed out"), "failing (timed out)"},
		{context.DeadlineExceeded, "failing (deadline exceeded)"},
	} {
		if got := describeBackendError(tc.err); got != tc.want {
			t.Errorf("%v: %q, want %q", tc.err, got, tc.want)
		}
	}
}

func TestDialCause(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{fmt.Errorf("failed to dial: all dials failed\n  * [/ip4/127.0.0.1/tcp/1] dial: %w", syscall.ECONNREFUSED), "connection refused"},
		{fmt.Errorf("dial backoff: %w", context.DeadlineExceeded), "no answer within 5s"},
		{errors.New("failed to negotiate security protocol: peer id mismatch: expected A, but remote key matches B"), "a different peer answers at that address (is the join token stale?)"},
		{errors.New("first line\nsecond line"), "first line"},
		{errors.New("failed to dial: failed to dial 12D3KooWHny: all dials failed\n  * [/ip4/127.0.0.1/tcp/43279] dial tcp4 127.0.0.1:43279: i/o timeout\n  * [/ip4/10.0.0.1/tcp/4001] other"), "dial tcp4 127.0.0.1:43279: i/o timeout"},
		{errors.New("failed to dial: failed to dial 12D3KooWHny: all dials failed\n  * [/ip4/127.0.0.1/tcp/43279] failed to negotiate security protocol: EOF"), "the connection closed during the handshake (" + refusedWhy + ")"},
		{errors.New("failed to dial: failed to dial 12D3KooWHny: all dials failed\n  * [/ip4/127.0.0.1/tcp/37179] failed to negotiate security protocol: read tcp4 127.0.0.1:44593->127.0.0.1:37179: read: connection reset by peer"), "the connection closed during the handshake (" + refusedWhy + ")"},
		{discovery.ErrClosedAtOnce, "the connection closed right after the handshake (" + refusedWhy + ")"},
	} {
		if got := dialCause(tc.err, 5*time.Second); got != tc.want {
			t.Errorf("%v: %q, want %q", tc.err, got, tc.want)
		}
	}
}
