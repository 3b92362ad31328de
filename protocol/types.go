package protocol

import (
	"fmt"
	"strings"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// typeNames are the user-facing names of the query types, as used by the
// CLI, announcements shown to people and the bridge.
var typeNames = [...]string{
	pb.QueryType_QUERY_TYPE_CHAT:    "chat",
	pb.QueryType_QUERY_TYPE_VISION:  "vision",
	pb.QueryType_QUERY_TYPE_IMAGINE: "imagine",
	pb.QueryType_QUERY_TYPE_STT:     "stt",
	pb.QueryType_QUERY_TYPE_TTS:     "tts",
	pb.QueryType_QUERY_TYPE_EMBED:   "embed",
}

// TypeName is the short name of t ("chat", "vision", ...).
func TypeName(t pb.QueryType) string {
	if int(t) > 0 && int(t) < len(typeNames) {
		return typeNames[t]
	}
	return fmt.Sprintf("type_%d", t)
}

// ParseType parses a short name; "speech-to-text", "speech", "text-to-speech",
// "embeddings" and "embedding" are accepted as aliases.
func ParseType(s string) (pb.QueryType, error) {
	s = strings.ToLower(strings.TrimSpace(s))
	switch s {
	case "speech-to-text", "speech", "transcribe":
		s = "stt"
	case "text-to-speech":
		s = "tts"
	case "embeddings", "embedding":
		s = "embed"
	case "image":
		s = "imagine"
	}
	for i, n := range typeNames {
		if i > 0 && n == s {
			return pb.QueryType(i), nil
		}
	}
	return 0, Errorf(CodeBadRequest, "unknown query type %q (want chat, vision, imagine, stt, tts or embed)", s)
}

// AllTypes lists every defined query type in order.
func AllTypes() []pb.QueryType {
	out := make([]pb.QueryType, 0, len(typeNames)-1)
	for i := 1; i < len(typeNames); i++ {
		out = append(out, pb.QueryType(i))
	}
	return out
}
