package bridge

import (
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Short names for the tests' tables.
type (
	pbEvent        = pb.Event
	pbCode         = pb.ErrorCode
	pbQueryRequest = pb.QueryRequest
	routerModel    = router.ModelView
)

const (
	codeBadRequest  = protocol.CodeBadRequest
	codeUnsupported = protocol.CodeUnsupported
	codeBusy        = protocol.CodeBusy
	codeTooLarge    = protocol.CodeTooLarge
	codeBackend     = protocol.CodeBackendError
	codeTimeout     = protocol.CodeTimeout
	codeInternal    = protocol.CodeInternal
)

func protoErr(c pbCode, msg string) error { return protocol.Errorf(c, "%s", msg) }

func accepted() *pb.Event {
	return &pb.Event{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{}}}
}

func chunk(text string) *pb.Event {
	return &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: text}}}
}

func mediaEvent(mime, data string) *pb.Event {
	return &pb.Event{Kind: &pb.Event_Media{Media: &pb.Media{Mime: mime, Data: []byte(data)}}}
}
