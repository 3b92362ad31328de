package protocol

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/libp2p/go-libp2p/core/network"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Error is a typed protocol error. It travels on the wire as pb.Error and is
// what every layer returns so that a client can always read a code.
type Error struct {
	Code      pb.ErrorCode
	Message   string
	Retryable bool
	// Field is the request field a BAD_REQUEST of ValidateRequest is
	// about ("max_tokens"), or "". It is not on the wire.
	Field string
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: %s", CodeName(e.Code), e.Message)
}

// Is makes errors.Is(err, &Error{Code: c}) match on the code alone.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code && t.Message == ""
}

// Proto converts the error to its wire form.
func (e *Error) Proto() *pb.Error {
	// A protobuf string must be UTF-8; a message that is not (a custom
	// backend's error) would make the error event itself unsendable.
	return &pb.Error{Code: e.Code, Message: strings.ToValidUTF8(e.Message, "\uFFFD"), Retryable: e.Retryable}
}

// Errorf builds a typed error. Retryable defaults per code (see retryable).
func Errorf(code pb.ErrorCode, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...), Retryable: retryable(code)}
}

// FromProto converts a wire error; a nil or unspecified code becomes INTERNAL.
func FromProto(p *pb.Error) *Error {
	if p == nil {
		return &Error{Code: pb.ErrorCode_ERROR_CODE_INTERNAL, Message: "missing error"}
	}
	code := p.GetCode()
	if _, ok := pb.ErrorCode_name[int32(code)]; !ok || code == pb.ErrorCode_ERROR_CODE_UNSPECIFIED {
		code = pb.ErrorCode_ERROR_CODE_INTERNAL
	}
	return &Error{Code: code, Message: p.GetMessage(), Retryable: p.GetRetryable()}
}

// retryable says whether another worker could answer a query that failed
// with code: only failures of that worker, not of the request.
func retryable(code pb.ErrorCode) bool {
	switch code {
	case pb.ErrorCode_ERROR_CODE_BUSY, pb.ErrorCode_ERROR_CODE_BACKEND_ERROR, pb.ErrorCode_ERROR_CODE_INTERNAL,
		pb.ErrorCode_ERROR_CODE_UNAVAILABLE:
		return true
	}
	return false
}

// CodeName is the short name of a code (BAD_REQUEST, BUSY, ...).
func CodeName(c pb.ErrorCode) string {
	n, ok := pb.ErrorCode_name[int32(c)]
	if !ok {
		return fmt.Sprintf("CODE_%d", c)
	}
	return n[len("ERROR_CODE_"):]
}

// AsError turns any error into a typed one: typed errors pass through,
// context errors become TIMEOUT or CANCELLED, anything else INTERNAL.
func AsError(err error) *Error {
	if err == nil {
		return nil
	}
	var pe *Error
	if errors.As(err, &pe) {
		return pe
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return Errorf(pb.ErrorCode_ERROR_CODE_TIMEOUT, "deadline exceeded")
	case errors.Is(err, context.Canceled):
		return Errorf(pb.ErrorCode_ERROR_CODE_CANCELLED, "cancelled")
	}
	return Errorf(pb.ErrorCode_ERROR_CODE_INTERNAL, "%v", err)
}

// Shorthands for the codes, used throughout the code base.
const (
	CodeBadRequest   = pb.ErrorCode_ERROR_CODE_BAD_REQUEST
	CodeUnsupported  = pb.ErrorCode_ERROR_CODE_UNSUPPORTED
	CodeBusy         = pb.ErrorCode_ERROR_CODE_BUSY
	CodeTooLarge     = pb.ErrorCode_ERROR_CODE_TOO_LARGE
	CodeBackendError = pb.ErrorCode_ERROR_CODE_BACKEND_ERROR
	CodeTimeout      = pb.ErrorCode_ERROR_CODE_TIMEOUT
	CodeCancelled    = pb.ErrorCode_ERROR_CODE_CANCELLED
	CodeInternal     = pb.ErrorCode_ERROR_CODE_INTERNAL
	CodeUnavailable  = pb.ErrorCode_ERROR_CODE_UNAVAILABLE
)

// RefusedAtLimit reports whether err is a stream the peer reset at one of
// its limits (libp2p's StreamResourceLimitExceeded: its resource manager's,
// or a worker's or hole-punch service's streams at a time): the peer is
// busy, not failing, and a new stream may be taken later.
func RefusedAtLimit(err error) bool {
	var se *network.StreamError
	return errors.As(err, &se) && se.Remote && se.ErrorCode == network.StreamResourceLimitExceeded
}
