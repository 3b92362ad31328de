package protocol

import (
	"context"
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/libp2p/go-libp2p/core/network"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

func TestCodeName(t *testing.T) {
	want := map[pb.ErrorCode]string{
		CodeBadRequest:   "BAD_REQUEST",
		CodeUnsupported:  "UNSUPPORTED",
		CodeBusy:         "BUSY",
		CodeTooLarge:     "TOO_LARGE",
		CodeBackendError: "BACKEND_ERROR",
		CodeTimeout:      "TIMEOUT",
		CodeCancelled:    "CANCELLED",
		CodeInternal:     "INTERNAL",
		0:                "UNSPECIFIED",
		42:               "CODE_42",
		-1:               "CODE_-1",
	}
	for c, w := range want {
		if got := CodeName(c); got != w {
			t.Errorf("CodeName(%d) = %q, want %q", c, got, w)
		}
	}
}

// TestErrorfRetryable pins the default retryability of each code: only a
// failure of the worker, not of the request, may be retried elsewhere.
func TestErrorfRetryable(t *testing.T) {
	want := map[pb.ErrorCode]bool{
		CodeBadRequest:   false,
		CodeUnsupported:  false,
		CodeBusy:         true,
		CodeTooLarge:     false,
		CodeBackendError: true,
		CodeTimeout:      false,
		CodeCancelled:    false,
		CodeInternal:     true,
		CodeUnavailable:  true,
	}
	if len(want) != len(pb.ErrorCode_name)-1 {
		t.Fatalf("table covers %d codes, proto has %d", len(want), len(pb.ErrorCode_name)-1)
	}
	for c, retry := range want {
		e := Errorf(c, "model %q, %d tries", "m", 3)
		if e.Code != c || e.Retryable != retry || e.Message != `model "m", 3 tries` {
			t.Errorf("Errorf(%s) = %+v, want retryable=%v", CodeName(c), e, retry)
		}
		if got, want := e.Error(), CodeName(c)+`: model "m", 3 tries`; got != want {
			t.Errorf("Error() = %q, want %q", got, want)
		}
	}
}

func TestErrorsIs(t *testing.T) {
	busy := Errorf(CodeBusy, "queue full")
	wrapped := fmt.Errorf("dial worker: %w", busy)

	if !errors.Is(wrapped, &Error{Code: CodeBusy}) {
		t.Error("wrapped BUSY does not match a code-only BUSY target")
	}
	if errors.Is(wrapped, &Error{Code: CodeTimeout}) {
		t.Error("BUSY matches TIMEOUT")
	}
	// A target with a message is a specific error, not a code pattern.
	if errors.Is(wrapped, &Error{Code: CodeBusy, Message: "queue full"}) {
		t.Error("a target with a message matched a different *Error value")
	}
	if !errors.Is(wrapped, busy) {
		t.Error("the same *Error value does not match itself")
	}
	if errors.Is(io.EOF, &Error{Code: CodeBusy}) {
		t.Error("a plain error matches a typed target")
	}
	var pe *Error
	if !errors.As(wrapped, &pe) || pe != busy {
		t.Error("errors.As does not find the typed error")
	}
}

func TestProtoRoundTrip(t *testing.T) {
	e := &Error{Code: CodeTooLarge, Message: "frame of 9 MiB", Retryable: false}
	p := e.Proto()
	if p.GetCode() != CodeTooLarge || p.GetMessage() != e.Message || p.GetRetryable() {
		t.Fatalf("Proto() = %v", p)
	}
	back := FromProto(p)
	if *back != *e {
		t.Fatalf("FromProto(Proto()) = %+v, want %+v", back, e)
	}
}

func TestFromProto(t *testing.T) {
	tests := []struct {
		name string
		in   *pb.Error
		want Error
	}{
		{"nil", nil, Error{Code: CodeInternal, Message: "missing error"}},
		{"unspecified", &pb.Error{Message: "x", Retryable: true}, Error{Code: CodeInternal, Message: "x", Retryable: true}},
		{"unknown code", &pb.Error{Code: 99, Message: "future"}, Error{Code: CodeInternal, Message: "future"}},
		{"negative code", &pb.Error{Code: -2}, Error{Code: CodeInternal}},
		// The wire's retryable flag wins over the code's default.
		{"busy not retryable", &pb.Error{Code: CodeBusy, Message: "draining"}, Error{Code: CodeBusy, Message: "draining"}},
		{"timeout retryable", &pb.Error{Code: CodeTimeout, Retryable: true}, Error{Code: CodeTimeout, Retryable: true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := FromProto(tc.in); *got != tc.want {
				t.Fatalf("FromProto = %+v, want %+v", *got, tc.want)
			}
		})
	}
}

func TestAsError(t *testing.T) {
	if AsError(nil) != nil {
		t.Fatal("AsError(nil) != nil")
	}
	busy := Errorf(CodeBusy, "full")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		name      string
		in        error
		code      pb.ErrorCode
		retryable bool
		msg       string
	}{
		{"typed passes through", busy, CodeBusy, true, "full"},
		{"wrapped typed", fmt.Errorf("a: %w", fmt.Errorf("b: %w", busy)), CodeBusy, true, "full"},
		{"deadline", context.DeadlineExceeded, CodeTimeout, false, "deadline exceeded"},
		{"wrapped deadline", fmt.Errorf("backend: %w", context.DeadlineExceeded), CodeTimeout, false, "deadline exceeded"},
		{"cancelled", ctx.Err(), CodeCancelled, false, "cancelled"},
		{"other", io.ErrUnexpectedEOF, CodeInternal, true, "unexpected EOF"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := AsError(tc.in)
			if got.Code != tc.code || got.Retryable != tc.retryable || got.Message != tc.msg {
				t.Fatalf("AsError(%v) = %+v, want %s retryable=%v %q", tc.in, got, CodeName(tc.code), tc.retryable, tc.msg)
			}
		})
	}
	if AsError(busy) != busy {
		t.Error("AsError copied a typed error instead of returning it")
	}
}

func TestRefusedAtLimit(t *testing.T) {
	limit := &network.StreamError{ErrorCode: network.StreamResourceLimitExceeded, Remote: true}
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"the peer's reset at its limit", limit, true},
		{"wrapped", fmt.Errorf("open stream: %w", limit), true},
		{"this end's own reset", &network.StreamError{ErrorCode: network.StreamResourceLimitExceeded}, false},
		{"another code", &network.StreamError{ErrorCode: network.StreamProtocolViolation, Remote: true}, false},
		{"another error", errors.New("connection closed"), false},
		{"none", nil, false},
	} {
		if got := RefusedAtLimit(tc.err); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
