package protocol

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/mtor-swarm/mtor/protocol/pb"
	"google.golang.org/protobuf/proto"
)

func testID() []byte {
	return []byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
}

// validChat is the smallest request that passes validation; each case below
// breaks exactly one rule of a fresh copy.
func validChat() *pb.QueryRequest {
	return &pb.QueryRequest{
		Id:       testID(),
		Type:     pb.QueryType_QUERY_TYPE_CHAT,
		Model:    "demo",
		Messages: []*pb.Message{{Role: "user", Content: "hello"}},
	}
}

func img() *pb.Attachment {
	return &pb.Attachment{Mime: "image/png", Data: []byte{0x89, 'P', 'N', 'G'}}
}
func snd() *pb.Attachment    { return &pb.Attachment{Mime: "audio/wav", Data: []byte("RIFF")} }
func f32(v float32) *float32 { return &v }
func i64(v int64) *int64     { return &v }

func attachments(n int, mk func() *pb.Attachment) []*pb.Attachment {
	out := make([]*pb.Attachment, n)
	for i := range out {
		out[i] = mk()
	}
	return out
}

func strs(n int, s string) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = s
	}
	return out
}

// wantBadRequest checks that err is a typed BAD_REQUEST whose message
// mentions substr, so that a case fails for the rule it is about.
func wantBadRequest(t *testing.T, err error, substr string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got nil, want BAD_REQUEST mentioning %q", substr)
	}
	var pe *Error
	if !errors.As(err, &pe) {
		t.Fatalf("error %v (%T) is not a *protocol.Error", err, err)
	}
	if pe.Code != CodeBadRequest || pe.Retryable {
		t.Fatalf("got code %s retryable=%v, want BAD_REQUEST, not retryable", CodeName(pe.Code), pe.Retryable)
	}
	if !strings.Contains(pe.Message, substr) {
		t.Fatalf("error %q does not mention %q", pe.Message, substr)
	}
}

func TestValidateRequest(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(r *pb.QueryRequest)
		wantErr string // "" = valid
	}{
		{"minimal chat", func(r *pb.QueryRequest) {}, ""},
		{"chat with prompt only", func(r *pb.QueryRequest) { r.Messages = nil; r.Prompt = "hi" }, ""},
		{"all roles", func(r *pb.QueryRequest) {
			for _, role := range []string{"system", "user", "assistant", "tool"} {
				r.Messages = append(r.Messages, &pb.Message{Role: role, Content: "x"})
			}
		}, ""},
		{"full params", func(r *pb.QueryRequest) {
			r.Params = &pb.Params{MaxTokens: MaxMaxTokens, Temperature: f32(2), TopP: f32(1),
				Stop: strs(MaxStops, strings.Repeat("s", MaxStopLen)), Seed: i64(-1),
				Size: "1024x768", Voice: strings.Repeat("v", 64), Format: strings.Repeat("f", 32)}
		}, ""},
		{"params at zero", func(r *pb.QueryRequest) { r.Params = &pb.Params{Temperature: f32(0), TopP: f32(0)} }, ""},
		{"limits at maximum", func(r *pb.QueryRequest) {
			r.Model = strings.Repeat("m", MaxModelName)
			r.Messages = make([]*pb.Message, MaxMessages)
			for i := range r.Messages {
				r.Messages[i] = &pb.Message{Role: "user", Content: "x", Attachments: attachments(MaxAttachments, img)}
			}
			r.Attachments = attachments(MaxAttachments, img)
			r.Inputs = strs(MaxInputs, "x")
			r.Priority = MaxPriority
			r.DeadlineUnixMs = math.MaxInt64
		}, ""},
		{"lowest priority", func(r *pb.QueryRequest) { r.Priority = -MaxPriority }, ""},
		{"model with unicode and slashes", func(r *pb.QueryRequest) { r.Model = "library/llama3.2:3b-ü" }, ""},

		{"nil id", func(r *pb.QueryRequest) { r.Id = nil }, "id must be 16 bytes, got 0"},
		{"short id", func(r *pb.QueryRequest) { r.Id = r.Id[:15] }, "id must be 16 bytes, got 15"},
		{"long id", func(r *pb.QueryRequest) { r.Id = append(r.Id, 0) }, "id must be 16 bytes, got 17"},
		{"unspecified type", func(r *pb.QueryRequest) { r.Type = pb.QueryType_QUERY_TYPE_UNSPECIFIED }, "unknown query type 0"},
		{"type past the last", func(r *pb.QueryRequest) { r.Type = 7 }, "unknown query type 7"},
		{"negative type", func(r *pb.QueryRequest) { r.Type = -1 }, "unknown query type -1"},
		{"no model", func(r *pb.QueryRequest) { r.Model = "" }, "model is required"},
		{"model too long", func(r *pb.QueryRequest) { r.Model = strings.Repeat("m", MaxModelName+1) }, "model name is 129 bytes"},
		{"model with newline", func(r *pb.QueryRequest) { r.Model = "demo\n" }, "control characters"},
		{"model with NUL", func(r *pb.QueryRequest) { r.Model = "de\x00mo" }, "control characters"},
		{"model with DEL", func(r *pb.QueryRequest) { r.Model = "demo\x7f" }, "control characters"},
		{"model with C1 control", func(r *pb.QueryRequest) { r.Model = "demo\u0085" }, "control characters"},
		{"too many messages", func(r *pb.QueryRequest) {
			for len(r.Messages) <= MaxMessages {
				r.Messages = append(r.Messages, &pb.Message{Role: "user", Content: "x"})
			}
		}, "257 messages, limit 256"},
		{"empty role", func(r *pb.QueryRequest) { r.Messages[0].Role = "" }, `messages[0]: unknown role ""`},
		{"unknown role", func(r *pb.QueryRequest) {
			r.Messages = append(r.Messages, &pb.Message{Role: "User", Content: "x"})
		}, `messages[1]: unknown role "User"`},
		{"too many message attachments", func(r *pb.QueryRequest) {
			r.Messages[0].Attachments = attachments(MaxAttachments+1, img)
		}, "messages[0]: 9 attachments, limit 8"},
		{"message attachment without mime", func(r *pb.QueryRequest) {
			r.Messages[0].Attachments = []*pb.Attachment{{Data: []byte{1}}}
		}, `attachment mime "" is invalid`},
		{"message attachment mime with space", func(r *pb.QueryRequest) {
			r.Messages[0].Attachments = []*pb.Attachment{{Mime: "image/png; x=1 2", Data: []byte{1}}}
		}, "is invalid"},
		{"message attachment mime with CR", func(r *pb.QueryRequest) {
			r.Messages[0].Attachments = []*pb.Attachment{{Mime: "image/png\r", Data: []byte{1}}}
		}, "is invalid"},
		{"message attachment mime too long", func(r *pb.QueryRequest) {
			r.Messages[0].Attachments = []*pb.Attachment{{Mime: strings.Repeat("a", MaxMime+1), Data: []byte{1}}}
		}, "is invalid"},
		{"message attachment empty", func(r *pb.QueryRequest) {
			r.Messages[0].Attachments = []*pb.Attachment{{Mime: "image/png"}}
		}, "attachment of type image/png is empty"},
		{"too many request attachments", func(r *pb.QueryRequest) { r.Attachments = attachments(MaxAttachments+1, snd) }, "9 attachments, limit 8"},
		{"request attachment without mime", func(r *pb.QueryRequest) {
			r.Attachments = []*pb.Attachment{{Data: []byte{1}}}
		}, `request: attachment mime ""`},
		{"request attachment empty", func(r *pb.QueryRequest) {
			r.Attachments = []*pb.Attachment{{Mime: "audio/wav", Data: []byte{}}}
		}, "request: attachment of type audio/wav is empty"},
		{"too many inputs", func(r *pb.QueryRequest) { r.Inputs = strs(MaxInputs+1, "x") }, "257 inputs, limit 256"},
		{"max_tokens over limit", func(r *pb.QueryRequest) { r.Params = &pb.Params{MaxTokens: MaxMaxTokens + 1} }, "max_tokens 1048577 over limit"},
		{"negative temperature", func(r *pb.QueryRequest) { r.Params = &pb.Params{Temperature: f32(-0.01)} }, "temperature"},
		{"temperature over 2", func(r *pb.QueryRequest) { r.Params = &pb.Params{Temperature: f32(2.01)} }, "temperature"},
		{"temperature NaN", func(r *pb.QueryRequest) { r.Params = &pb.Params{Temperature: f32(float32(math.NaN()))} }, "temperature NaN"},
		{"temperature +Inf", func(r *pb.QueryRequest) { r.Params = &pb.Params{Temperature: f32(float32(math.Inf(1)))} }, "temperature"},
		{"temperature -Inf", func(r *pb.QueryRequest) { r.Params = &pb.Params{Temperature: f32(float32(math.Inf(-1)))} }, "temperature"},
		{"negative top_p", func(r *pb.QueryRequest) { r.Params = &pb.Params{TopP: f32(-1)} }, "top_p"},
		{"top_p over 1", func(r *pb.QueryRequest) { r.Params = &pb.Params{TopP: f32(1.0001)} }, "top_p"},
		{"top_p NaN", func(r *pb.QueryRequest) { r.Params = &pb.Params{TopP: f32(float32(math.NaN()))} }, "top_p NaN"},
		{"too many stops", func(r *pb.QueryRequest) { r.Params = &pb.Params{Stop: strs(MaxStops+1, "x")} }, "9 stop sequences, limit 8"},
		{"empty stop", func(r *pb.QueryRequest) { r.Params = &pb.Params{Stop: []string{"a", ""}} }, "stop sequence must be 1-64 bytes"},
		{"stop too long", func(r *pb.QueryRequest) {
			r.Params = &pb.Params{Stop: []string{strings.Repeat("s", MaxStopLen+1)}}
		}, "stop sequence must be 1-64 bytes"},
		{"size without x", func(r *pb.QueryRequest) { r.Params = &pb.Params{Size: "1024"} }, "WIDTHxHEIGHT"},
		{"size with zero", func(r *pb.QueryRequest) { r.Params = &pb.Params{Size: "0x512"} }, "WIDTHxHEIGHT"},
		{"size with leading zero", func(r *pb.QueryRequest) { r.Params = &pb.Params{Size: "512x0512"} }, "WIDTHxHEIGHT"},
		{"size too big", func(r *pb.QueryRequest) { r.Params = &pb.Params{Size: "10000x512"} }, "WIDTHxHEIGHT"},
		{"size with capital X", func(r *pb.QueryRequest) { r.Params = &pb.Params{Size: "512X512"} }, "WIDTHxHEIGHT"},
		{"size with trailing newline", func(r *pb.QueryRequest) { r.Params = &pb.Params{Size: "512x512\n"} }, "WIDTHxHEIGHT"},
		{"voice too long", func(r *pb.QueryRequest) { r.Params = &pb.Params{Voice: strings.Repeat("v", 65)} }, "voice of 65 bytes, limit 64"},
		{"format too long", func(r *pb.QueryRequest) { r.Params = &pb.Params{Format: strings.Repeat("f", 33)} }, "format of 33 bytes, limit 32"},
		{"negative deadline", func(r *pb.QueryRequest) { r.DeadlineUnixMs = -1 }, "negative deadline"},
		{"priority too high", func(r *pb.QueryRequest) { r.Priority = MaxPriority + 1 }, "priority 11 out of range [-10, 10]"},
		{"priority too low", func(r *pb.QueryRequest) { r.Priority = -MaxPriority - 1 }, "priority -11 out of range"},
		{"chat without text", func(r *pb.QueryRequest) { r.Messages = nil }, "chat query needs a prompt or messages"},
		{"chat with blank text only", func(r *pb.QueryRequest) {
			r.Messages[0].Content = " \n\t"
			r.Prompt = "  "
		}, "chat query needs a prompt or messages"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := validChat()
			tc.mutate(r)
			err := ValidateRequest(r)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			wantBadRequest(t, err, tc.wantErr)
		})
	}
}

func TestValidateRequestNil(t *testing.T) {
	wantBadRequest(t, ValidateRequest(nil), "empty request")
	wantBadRequest(t, ValidateRequest(&pb.QueryRequest{}), "id must be 16 bytes")
}

// TestValidateRequestPerType checks that each query type demands its own
// input, so a worker never starts a backend call that must fail.
func TestValidateRequestPerType(t *testing.T) {
	const (
		chat    = pb.QueryType_QUERY_TYPE_CHAT
		vision  = pb.QueryType_QUERY_TYPE_VISION
		imagine = pb.QueryType_QUERY_TYPE_IMAGINE
		stt     = pb.QueryType_QUERY_TYPE_STT
		tts     = pb.QueryType_QUERY_TYPE_TTS
		embed   = pb.QueryType_QUERY_TYPE_EMBED
	)
	tests := []struct {
		name    string
		typ     pb.QueryType
		req     *pb.QueryRequest // Id, Type and Model are filled in
		wantErr string
	}{
		{"chat prompt", chat, &pb.QueryRequest{Prompt: "hi"}, ""},
		{"chat nothing", chat, &pb.QueryRequest{}, "chat query needs a prompt or messages"},
		{"chat image only", chat, &pb.QueryRequest{Attachments: []*pb.Attachment{img()}}, "chat query needs"},

		{"vision image in message", vision, &pb.QueryRequest{Messages: []*pb.Message{{Role: "user", Content: "what is this", Attachments: []*pb.Attachment{img()}}}}, ""},
		{"vision image at request level", vision, &pb.QueryRequest{Prompt: "describe", Attachments: []*pb.Attachment{img()}}, ""},
		{"vision image without text", vision, &pb.QueryRequest{Attachments: []*pb.Attachment{img()}}, ""},
		{"vision text only", vision, &pb.QueryRequest{Prompt: "describe"}, "vision query needs an image attachment"},
		{"vision audio only", vision, &pb.QueryRequest{Prompt: "describe", Attachments: []*pb.Attachment{snd()}}, "vision query needs an image attachment"},

		{"imagine prompt", imagine, &pb.QueryRequest{Prompt: "a cat", Params: &pb.Params{Size: "512x512"}}, ""},
		{"imagine messages", imagine, &pb.QueryRequest{Messages: []*pb.Message{{Role: "user", Content: "a cat"}}}, ""},
		{"imagine nothing", imagine, &pb.QueryRequest{}, "imagine query needs a prompt or messages"},

		{"stt audio", stt, &pb.QueryRequest{Attachments: []*pb.Attachment{snd()}}, ""},
		{"stt webm video", stt, &pb.QueryRequest{Attachments: []*pb.Attachment{{Mime: "video/webm", Data: []byte{1}}}}, ""},
		{"stt audio in message", stt, &pb.QueryRequest{Messages: []*pb.Message{{Role: "user", Attachments: []*pb.Attachment{snd()}}}}, ""},
		{"stt mp4 video", stt, &pb.QueryRequest{Attachments: []*pb.Attachment{{Mime: "video/mp4", Data: []byte{1}}}}, "stt query needs an audio attachment"},
		{"stt prompt only", stt, &pb.QueryRequest{Prompt: "hello"}, "stt query needs an audio attachment"},

		{"tts prompt", tts, &pb.QueryRequest{Prompt: "say this", Params: &pb.Params{Voice: "alloy", Format: "mp3"}}, ""},
		{"tts nothing", tts, &pb.QueryRequest{Attachments: []*pb.Attachment{snd()}}, "tts query needs a prompt or messages"},

		{"embed inputs", embed, &pb.QueryRequest{Inputs: []string{"a", "b"}}, ""},
		{"embed prompt", embed, &pb.QueryRequest{Prompt: "a"}, ""},
		{"embed blank prompt", embed, &pb.QueryRequest{Prompt: " "}, "embed query needs inputs or a prompt"},
		{"embed messages only", embed, &pb.QueryRequest{Messages: []*pb.Message{{Role: "user", Content: "a"}}}, "embed query needs inputs or a prompt"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.req
			r.Id, r.Type, r.Model = testID(), tc.typ, "m"
			err := ValidateRequest(r)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			wantBadRequest(t, err, tc.wantErr)
		})
	}
}

func TestValidateModelName(t *testing.T) {
	for _, ok := range []string{"m", "llama3.2:3b", "stabilityai/sdxl-turbo", strings.Repeat("x", MaxModelName), "モデル"} {
		if err := ValidateModelName(ok); err != nil {
			t.Errorf("ValidateModelName(%q) = %v, want nil", ok, err)
		}
	}
	for _, bad := range []string{"", strings.Repeat("x", MaxModelName+1), "a\tb", "a\x1bb"} {
		var pe *Error
		if err := ValidateModelName(bad); !errors.As(err, &pe) || pe.Code != CodeBadRequest {
			t.Errorf("ValidateModelName(%q) = %v, want BAD_REQUEST", bad, err)
		}
	}
}

func TestValidateEvent(t *testing.T) {
	ev := func(k any) *pb.Event {
		switch k := k.(type) {
		case *pb.Accepted:
			return &pb.Event{Kind: &pb.Event_Accepted{Accepted: k}}
		case *pb.Chunk:
			return &pb.Event{Kind: &pb.Event_Chunk{Chunk: k}}
		case *pb.Media:
			return &pb.Event{Kind: &pb.Event_Media{Media: k}}
		case *pb.Embedding:
			return &pb.Event{Kind: &pb.Event_Embedding{Embedding: k}}
		case *pb.Done:
			return &pb.Event{Kind: &pb.Event_Done{Done: k}}
		case *pb.Error:
			return &pb.Event{Kind: &pb.Event_Error{Error: k}}
		}
		panic("unknown kind")
	}
	tests := []struct {
		name    string
		ev      *pb.Event
		wantErr string
	}{
		{"accepted", ev(&pb.Accepted{QueuePosition: 3}), ""},
		{"accepted empty", ev(&pb.Accepted{}), ""},
		{"chunk", ev(&pb.Chunk{Text: "tok"}), ""},
		{"chunk empty", ev(&pb.Chunk{}), ""},
		{"chunk at limit", ev(&pb.Chunk{Text: strings.Repeat("x", MaxChunkText)}), ""},
		{"chunk over limit", ev(&pb.Chunk{Text: strings.Repeat("x", MaxChunkText+1)}), "chunk of 65537 bytes, limit 65536"},
		{"media", ev(&pb.Media{Mime: "image/png", Data: []byte{1}}), ""},
		{"media without mime", ev(&pb.Media{Data: []byte{1}}), "media event without a valid mime type"},
		{"media mime too long", ev(&pb.Media{Mime: strings.Repeat("a", MaxMime+1)}), "media event without a valid mime type"},
		{"embedding", ev(&pb.Embedding{Index: 1, Vector: []float32{0.5, -1}}), ""},
		{"embedding at limit", ev(&pb.Embedding{Vector: make([]float32, MaxEmbeddingDim)}), ""},
		{"embedding over limit", ev(&pb.Embedding{Vector: make([]float32, MaxEmbeddingDim+1)}), "embedding of dimension 65537, limit 65536"},
		{"done", ev(&pb.Done{Usage: &pb.Usage{PromptTokens: 1}, WorkerVersion: "x"}), ""},
		{"done empty", ev(&pb.Done{}), ""},
		{"error", ev(&pb.Error{Code: CodeBusy, Message: "full", Retryable: true}), ""},
		{"error every known code", nil, ""}, // expanded below
		{"error unspecified code", ev(&pb.Error{Message: "?"}), "error event with unknown code 0"},
		{"error unknown code", ev(&pb.Error{Code: 99}), "error event with unknown code 99"},
		{"error nil body", ev((*pb.Error)(nil)), "unknown code 0"},
		{"no kind", &pb.Event{}, "event with no kind"},
		{"nil event", nil, "event with no kind"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "error every known code" {
				for c := CodeBadRequest; c <= CodeInternal; c++ {
					if err := ValidateEvent(ev(&pb.Error{Code: c})); err != nil {
						t.Errorf("code %s: %v", CodeName(c), err)
					}
				}
				return
			}
			err := ValidateEvent(tc.ev)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			wantBadRequest(t, err, tc.wantErr)
		})
	}
}

var annNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func validAnnounce() *pb.Announce {
	return &pb.Announce{
		Seq:        uint64(annNow.UnixMilli()),
		TimeUnixMs: annNow.UnixMilli(),
		TtlMs:      30_000,
		Roles:      []string{"worker"},
		Version:    "mtor/1.0.0",
		Models: []*pb.ModelInfo{{
			Name: "demo", Types: []pb.QueryType{pb.QueryType_QUERY_TYPE_CHAT},
			ContextLength: 4096, TokensPerSec: 50, P50TtftMs: 20, JoulesPerToken: 0.1, Backend: "demo",
		}},
		Gpus:   []*pb.GPU{{Name: "NVIDIA H100", Uuid: "GPU-1", VramTotalBytes: 80 << 30, UtilPercent: 100, PowerMw: 300_000}},
		Load:   &pb.Load{InFlight: 1, MaxConcurrency: 4, Queued: 0, MaxQueue: 64},
		Health: 100,
	}
}

func TestValidateAnnounce(t *testing.T) {
	tests := []struct {
		name    string
		mutate  func(a *pb.Announce)
		wantErr string
	}{
		{"valid", func(a *pb.Announce) {}, ""},
		{"bridge without models or load", func(a *pb.Announce) {
			a.Roles, a.Models, a.Gpus, a.Load = []string{"bridge", "relay"}, nil, nil, nil
		}, ""},
		{"every type", func(a *pb.Announce) { a.Models[0].Types = AllTypes() }, ""},
		{"dated at the skew limit", func(a *pb.Announce) { a.TimeUnixMs = annNow.Add(MaxClockSkew).UnixMilli() }, ""},
		{"dated in the past", func(a *pb.Announce) { a.TimeUnixMs = annNow.Add(-time.Hour).UnixMilli() }, ""},
		{"ttl at minimum", func(a *pb.Announce) { a.TtlMs = uint32(MinAnnounceTTL.Milliseconds()) }, ""},
		{"ttl at maximum", func(a *pb.Announce) { a.TtlMs = uint32(MaxAnnounceTTL.Milliseconds()) }, ""},
		{"limits at maximum", func(a *pb.Announce) {
			a.Roles = strs(MaxAnnRoles, strings.Repeat("r", 32))
			a.Version = strings.Repeat("v", MaxVersionLen)
			m := a.Models[0]
			a.Models = nil
			for i := range MaxAnnModels {
				mi := proto.CloneOf(m)
				mi.Name = fmt.Sprintf("model-%d", i)
				a.Models = append(a.Models, mi)
			}
			a.Gpus = make([]*pb.GPU, MaxAnnGPUs)
			for i := range a.Gpus {
				a.Gpus[i] = &pb.GPU{Name: strings.Repeat("g", 128), Uuid: strings.Repeat("u", 128)}
			}
		}, ""},

		{"seq zero", func(a *pb.Announce) { a.Seq = 0 }, "seq must be > 0"},
		{"dated past the skew", func(a *pb.Announce) { a.TimeUnixMs = annNow.Add(MaxClockSkew + time.Millisecond).UnixMilli() }, "in the future"},
		{"dated far in the future", func(a *pb.Announce) { a.TimeUnixMs = math.MaxInt64 }, "in the future"},
		{"ttl zero", func(a *pb.Announce) { a.TtlMs = 0 }, "ttl 0s out of range"},
		{"ttl under minimum", func(a *pb.Announce) { a.TtlMs = 999 }, "ttl 999ms out of range [1s, 10m0s]"},
		{"ttl over maximum", func(a *pb.Announce) { a.TtlMs = 600_001 }, "out of range"},
		{"ttl max uint32", func(a *pb.Announce) { a.TtlMs = math.MaxUint32 }, "out of range"},
		{"too many roles", func(a *pb.Announce) { a.Roles = strs(MaxAnnRoles+1, "worker") }, "9 roles, limit 8"},
		{"empty role", func(a *pb.Announce) { a.Roles = []string{""} }, `invalid role ""`},
		{"role too long", func(a *pb.Announce) { a.Roles = []string{strings.Repeat("r", 33)} }, "invalid role"},
		{"version too long", func(a *pb.Announce) { a.Version = strings.Repeat("v", MaxVersionLen+1) }, "version too long"},
		{"too many models", func(a *pb.Announce) {
			for len(a.Models) <= MaxAnnModels {
				a.Models = append(a.Models, a.Models[0])
			}
		}, "257 models, limit 256"},
		{"model twice", func(a *pb.Announce) { a.Models = append(a.Models, a.Models[0]) }, `model "demo" announced twice`},
		{"model without name", func(a *pb.Announce) { a.Models[0].Name = "" }, "model is required"},
		{"model name with control", func(a *pb.Announce) { a.Models[0].Name = "a\nb" }, "control characters"},
		{"model without types", func(a *pb.Announce) { a.Models[0].Types = nil }, `model "demo" announces 0 types`},
		{"model with too many types", func(a *pb.Announce) { a.Models[0].Types = append(AllTypes(), 1) }, "announces 7 types"},
		{"model with unspecified type", func(a *pb.Announce) { a.Models[0].Types = []pb.QueryType{0} }, "announces unknown type 0"},
		{"model with unknown type", func(a *pb.Announce) { a.Models[0].Types = []pb.QueryType{1, 7} }, "announces unknown type 7"},
		{"model with negative type", func(a *pb.Announce) { a.Models[0].Types = []pb.QueryType{-3} }, "announces unknown type -3"},
		{"negative tokens/s", func(a *pb.Announce) { a.Models[0].TokensPerSec = -1 }, "invalid figures"},
		{"NaN tokens/s", func(a *pb.Announce) { a.Models[0].TokensPerSec = float32(math.NaN()) }, "invalid figures"},
		{"infinite tokens/s", func(a *pb.Announce) { a.Models[0].TokensPerSec = float32(math.Inf(1)) }, "invalid figures"},
		{"negative J/token", func(a *pb.Announce) { a.Models[0].JoulesPerToken = -0.5 }, "invalid figures"},
		{"NaN J/token", func(a *pb.Announce) { a.Models[0].JoulesPerToken = float32(math.NaN()) }, "invalid figures"},
		{"infinite J/token", func(a *pb.Announce) { a.Models[0].JoulesPerToken = float32(math.Inf(1)) }, "invalid figures"},
		{"backend name too long", func(a *pb.Announce) { a.Models[0].Backend = strings.Repeat("b", 33) }, "backend name too long"},
		{"too many gpus", func(a *pb.Announce) { a.Gpus = make([]*pb.GPU, MaxAnnGPUs+1) }, "17 gpus, limit 16"},
		{"gpu name too long", func(a *pb.Announce) { a.Gpus[0].Name = strings.Repeat("g", 129) }, "invalid gpu entry"},
		{"gpu uuid too long", func(a *pb.Announce) { a.Gpus[0].Uuid = strings.Repeat("u", 129) }, "invalid gpu entry"},
		{"gpu util over 100", func(a *pb.Announce) { a.Gpus[0].UtilPercent = 101 }, "invalid gpu entry"},
		{"health over 100", func(a *pb.Announce) { a.Health = 101 }, "health 101 over 100"},
		{"models with zero concurrency", func(a *pb.Announce) { a.Load.MaxConcurrency = 0 }, "max_concurrency 0"},
		{"models without load", func(a *pb.Announce) { a.Load = nil }, "max_concurrency 0"},
		{"concurrency beyond the bound", func(a *pb.Announce) { a.Load.MaxConcurrency = math.MaxUint32 }, "load beyond"},
		{"queue beyond the bound", func(a *pb.Announce) { a.Load.MaxQueue = MaxAnnSlots + 1 }, "load beyond"},
		{"queued beyond the bound", func(a *pb.Announce) { a.Load.Queued = MaxAnnSlots + 1 }, "load beyond"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := validAnnounce()
			tc.mutate(a)
			err := ValidateAnnounce(a, annNow)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("want valid, got %v", err)
				}
				return
			}
			wantBadRequest(t, err, tc.wantErr)
		})
	}
}

// TestValidateAnnounceTypical checks that a typical announcement stays well
// under the 1 KB the design asks for and under MaxAnnounce.
func TestValidateAnnounceTypical(t *testing.T) {
	a := validAnnounce()
	if err := ValidateAnnounce(a, annNow); err != nil {
		t.Fatal(err)
	}
	if n := proto.Size(a); n > 1024 || n > MaxAnnounce {
		t.Fatalf("typical announce is %d bytes", n)
	}
}

func TestValidateEventFor(t *testing.T) {
	chat := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT}
	withTools := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_CHAT, Tools: []*pb.Tool{{Name: "f"}}}
	imagine := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_IMAGINE}
	tts := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_TTS}
	embed := &pb.QueryRequest{Type: pb.QueryType_QUERY_TYPE_EMBED}
	tool := &pb.Event{Kind: &pb.Event_ToolCall{ToolCall: &pb.ToolCallDelta{Name: "f"}}}
	media := &pb.Event{Kind: &pb.Event_Media{Media: &pb.Media{Mime: "image/png"}}}
	vec := &pb.Event{Kind: &pb.Event_Embedding{Embedding: &pb.Embedding{Vector: []float32{1}}}}
	chunk := &pb.Event{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "x"}}}
	for _, tc := range []struct {
		name string
		req  *pb.QueryRequest
		ev   *pb.Event
		ok   bool
	}{
		{"text answers chat", chat, chunk, true},
		{"a tool call answers a query with tools", withTools, tool, true},
		{"a tool call never offered", chat, tool, false},
		{"an image answers imagine", imagine, media, true},
		{"audio answers tts", tts, media, true},
		{"media answers no chat", chat, media, false},
		{"a vector answers embed", embed, vec, true},
		{"a vector answers no chat", chat, vec, false},
		{"media answers no embed", embed, media, false},
	} {
		if err := ValidateEventFor(tc.req, tc.ev); (err == nil) != tc.ok {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

// TestValidateRequestNamesTheField: a refused request's error names the
// field it is about (Error.Field), which the bridge turns into OpenAI's
// param; not found in the message, whose wording may change.
func TestValidateRequestNamesTheField(t *testing.T) {
	for _, tc := range []struct {
		name, field string
		mutate      func(r *pb.QueryRequest)
	}{
		{"no model", "model", func(r *pb.QueryRequest) { r.Model = "" }},
		{"unknown role", "messages", func(r *pb.QueryRequest) { r.Messages[0].Role = "king" }},
		{"message attachment", "messages", func(r *pb.QueryRequest) { r.Messages[0].Attachments = []*pb.Attachment{{Mime: "image/png"}} }},
		{"request attachment", "attachments", func(r *pb.QueryRequest) { r.Attachments = []*pb.Attachment{{Mime: "audio/wav"}} }},
		{"too many inputs", "inputs", func(r *pb.QueryRequest) { r.Inputs = strs(MaxInputs+1, "x") }},
		{"too many stops", "stop", func(r *pb.QueryRequest) { r.Params = &pb.Params{Stop: strs(MaxStops+1, "x")} }},
		{"voice too long", "voice", func(r *pb.QueryRequest) { r.Params = &pb.Params{Voice: strings.Repeat("v", 65)} }},
		{"format too long", "format", func(r *pb.QueryRequest) { r.Params = &pb.Params{Format: strings.Repeat("f", 33)} }},
		{"picture without a prompt", "prompt", func(r *pb.QueryRequest) { r.Type, r.Messages = pb.QueryType_QUERY_TYPE_IMAGINE, nil }},
		{"frequency_penalty", "frequency_penalty", func(r *pb.QueryRequest) { r.Params = &pb.Params{FrequencyPenalty: f32(3)} }},
		{"presence_penalty", "presence_penalty", func(r *pb.QueryRequest) { r.Params = &pb.Params{PresencePenalty: f32(-3)} }},
		{"top_logprobs", "top_logprobs", func(r *pb.QueryRequest) { r.Params = &pb.Params{TopLogprobs: 2} }},
		{"tool name", "tools", func(r *pb.QueryRequest) { r.Tools = []*pb.Tool{{Name: "a b"}} }},
		{"tool parameters", "tools", func(r *pb.QueryRequest) { r.Tools = []*pb.Tool{{Name: "a", Parameters: "[1]"}} }},
		{"tool_choice", "tool_choice", func(r *pb.QueryRequest) { r.ToolChoice = &pb.ToolChoice{Mode: "always"} }},
		{"response_format", "response_format", func(r *pb.QueryRequest) { r.ResponseFormat = &pb.ResponseFormat{Type: "yaml"} }},
		{"response_format schema", "response_format", func(r *pb.QueryRequest) {
			r.ResponseFormat = &pb.ResponseFormat{Type: "json_schema", Name: "s", Schema: "7"}
		}},
		{"chat without text", "messages", func(r *pb.QueryRequest) { r.Messages = nil }},
		{"priority", "priority", func(r *pb.QueryRequest) { r.Priority = MaxPriority + 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := validChat()
			tc.mutate(r)
			err := ValidateRequest(r)
			var pe *Error
			if !errors.As(err, &pe) || pe.Code != CodeBadRequest || pe.Field != tc.field {
				t.Fatalf("error %v; want a BAD_REQUEST about %q", err, tc.field)
			}
		})
	}
}

// TestAttachmentPlaces: a message's attachments may say where they stand
// in its content (Attachment.at): all of them or none, in order, within
// the content; a request-level attachment has no place.
func TestAttachmentPlaces(t *testing.T) {
	at := func(n uint32) *uint32 { return &n }
	placed := func(place *uint32) *pb.Attachment { a := img(); a.At = place; return a }
	for _, tc := range []struct {
		name    string
		content string
		atts    []*pb.Attachment
		request *pb.Attachment
		ok      bool
	}{
		{name: "none placed", content: "ab", atts: []*pb.Attachment{placed(nil), placed(nil)}, ok: true},
		{name: "before, between, after", content: "ab\ncd", atts: []*pb.Attachment{placed(at(0)), placed(at(2)), placed(at(2)), placed(at(5))}, ok: true},
		{name: "no content", atts: []*pb.Attachment{placed(at(0))}, ok: true},
		{name: "past the content", content: "ab", atts: []*pb.Attachment{placed(at(3))}},
		{name: "inside a character", content: "é", atts: []*pb.Attachment{placed(at(1))}},
		{name: "after a character", content: "é!", atts: []*pb.Attachment{placed(at(2))}, ok: true},
		{name: "out of order", content: "abcd", atts: []*pb.Attachment{placed(at(3)), placed(at(1))}},
		{name: "placed then not", content: "ab", atts: []*pb.Attachment{placed(at(1)), placed(nil)}},
		{name: "not then placed", content: "ab", atts: []*pb.Attachment{placed(nil), placed(at(1))}},
		{name: "request-level placed", content: "ab", request: &pb.Attachment{Mime: "audio/wav", Data: []byte{1}, At: at(0)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := validChat()
			r.Messages[0].Content, r.Messages[0].Attachments = tc.content, tc.atts
			r.Messages = append(r.Messages, &pb.Message{Role: "user", Content: "and?"})
			if tc.request != nil {
				r.Attachments = []*pb.Attachment{tc.request}
			}
			err := ValidateRequest(r)
			if tc.ok {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			var pe *Error
			if !errors.As(err, &pe) || pe.Code != CodeBadRequest || (pe.Field != "messages" && pe.Field != "attachments") {
				t.Fatalf("error %v; want a BAD_REQUEST about the attachments", err)
			}
		})
	}
}
