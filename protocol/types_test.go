package protocol

import (
	"errors"
	"testing"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

func TestTypeNameRoundTrip(t *testing.T) {
	want := map[pb.QueryType]string{
		pb.QueryType_QUERY_TYPE_CHAT:    "chat",
		pb.QueryType_QUERY_TYPE_VISION:  "vision",
		pb.QueryType_QUERY_TYPE_IMAGINE: "imagine",
		pb.QueryType_QUERY_TYPE_STT:     "stt",
		pb.QueryType_QUERY_TYPE_TTS:     "tts",
		pb.QueryType_QUERY_TYPE_EMBED:   "embed",
	}
	all := AllTypes()
	if len(all) != len(want) || len(all) != len(pb.QueryType_name)-1 {
		t.Fatalf("AllTypes() = %v, want the %d types of the proto", all, len(pb.QueryType_name)-1)
	}
	for i, typ := range all {
		if typ != pb.QueryType(i+1) {
			t.Errorf("AllTypes()[%d] = %v, want in proto order", i, typ)
		}
		name := TypeName(typ)
		if name != want[typ] {
			t.Errorf("TypeName(%v) = %q, want %q", typ, name, want[typ])
		}
		got, err := ParseType(name)
		if err != nil || got != typ {
			t.Errorf("ParseType(%q) = %v, %v; want %v", name, got, err, typ)
		}
	}
}

func TestTypeNameUnknown(t *testing.T) {
	for typ, want := range map[pb.QueryType]string{0: "type_0", 7: "type_7", -1: "type_-1", 1 << 30: "type_1073741824"} {
		if got := TypeName(typ); got != want {
			t.Errorf("TypeName(%d) = %q, want %q", typ, got, want)
		}
	}
}

func TestParseType(t *testing.T) {
	tests := []struct {
		in   string
		want pb.QueryType
	}{
		{"chat", pb.QueryType_QUERY_TYPE_CHAT},
		{" CHAT\n", pb.QueryType_QUERY_TYPE_CHAT},
		{"Vision", pb.QueryType_QUERY_TYPE_VISION},
		{"image", pb.QueryType_QUERY_TYPE_IMAGINE},
		{"speech-to-text", pb.QueryType_QUERY_TYPE_STT},
		{"speech", pb.QueryType_QUERY_TYPE_STT},
		{"transcribe", pb.QueryType_QUERY_TYPE_STT},
		{"text-to-speech", pb.QueryType_QUERY_TYPE_TTS},
		{"embeddings", pb.QueryType_QUERY_TYPE_EMBED},
		{"embedding", pb.QueryType_QUERY_TYPE_EMBED},
	}
	for _, tc := range tests {
		got, err := ParseType(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseType(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", "unspecified", "type_1", "QUERY_TYPE_CHAT", "1", "chatt"} {
		got, err := ParseType(bad)
		if !errors.Is(err, &Error{Code: CodeBadRequest}) || got != pb.QueryType_QUERY_TYPE_UNSPECIFIED {
			t.Errorf("ParseType(%q) = %v, %v; want UNSPECIFIED and BAD_REQUEST", bad, got, err)
		}
	}
}
