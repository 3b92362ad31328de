package protocol

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/ipfs/go-cid"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/multiformats/go-multihash"
	"google.golang.org/protobuf/proto"
)

const docPath = "../docs/protocol.md"

// The messages of the worked examples in docs/protocol.md.
func docRequest() *pb.QueryRequest {
	return &pb.QueryRequest{
		Id:             testID(),
		Type:           pb.QueryType_QUERY_TYPE_CHAT,
		Model:          "demo",
		Messages:       []*pb.Message{{Role: "user", Content: "Hello"}},
		Params:         &pb.Params{MaxTokens: 16, Temperature: f32(0.5)},
		DeadlineUnixMs: 1767225600000, // 2026-01-01T00:00:00Z
	}
}

func docEvents() []*pb.Event {
	return []*pb.Event{
		{Kind: &pb.Event_Accepted{Accepted: &pb.Accepted{QueuePosition: 1}}},
		{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "Hel"}}},
		{Kind: &pb.Event_Chunk{Chunk: &pb.Chunk{Text: "lo"}}},
		{Kind: &pb.Event_Done{Done: &pb.Done{
			Usage:         &pb.Usage{PromptTokens: 5, CompletionTokens: 2},
			Timing:        &pb.Timing{QueueMs: 12, TtftMs: 30, TotalMs: 41},
			WorkerVersion: "mtor/1.0.0",
			Model:         "demo",
		}}},
	}
}

func docError() *pb.Event {
	return &pb.Event{Kind: &pb.Event_Error{Error: &pb.Error{Code: CodeBusy, Message: "queue full", Retryable: true}}}
}

// docProviderKey is the provider key of model "demo" in the default swarm,
// built from its definition: CIDv1, raw codec, sha2-256 multihash.
func docProviderKey(t *testing.T) (cid.Cid, []byte) {
	key := ModelKey(DefaultSwarm, "demo")
	digest := sha256.Sum256([]byte(key))
	byHand := append([]byte{0x01, 0x55, 0x12, 0x20}, digest[:]...)
	mh, err := multihash.Sum([]byte(key), multihash.SHA2_256, -1)
	if err != nil {
		t.Fatal(err)
	}
	c := cid.NewCidV1(cid.Raw, mh)
	if !bytes.Equal(c.Bytes(), byHand) {
		t.Fatalf("go-cid gives % x, the definition % x", c.Bytes(), byHand)
	}
	return c, byHand
}

// TestDocExamples keeps the byte-level examples of docs/protocol.md equal
// to what this code puts on the wire, so the spec cannot drift.
func TestDocExamples(t *testing.T) {
	raw, err := os.ReadFile(docPath)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)

	req := docRequest()
	if err := ValidateRequest(req); err != nil {
		t.Fatalf("the doc's request is invalid: %v", err)
	}
	reqWire, err := AppendFrame(nil, req)
	if err != nil {
		t.Fatal(err)
	}
	events := docEvents()
	for _, e := range append(events, docError()) {
		if err := ValidateEvent(e); err != nil {
			t.Fatalf("the doc's event %v is invalid: %v", e, err)
		}
	}
	c, keyBytes := docProviderKey(t)

	examples := map[string][]byte{
		"query-request": reqWire,
		"event-stream":  writeFrames(t, events...),
		"error-event":   writeFrames(t, docError()),
		"provider-key":  keyBytes,
	}
	for name, want := range examples {
		t.Run(name, func(t *testing.T) {
			got, err := docHexBlock(doc, name)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("docs/protocol.md example %q is\n%s\nthe code encodes\n%s", name, hexLines(got), hexLines(want))
			}
		})
	}
	if !strings.Contains(doc, "`"+c.String()+"`") {
		t.Errorf("doc does not give the provider key's string form `%s`", c)
	}
	if !strings.Contains(doc, "`"+ModelKey(DefaultSwarm, "demo")+"`") {
		t.Errorf("doc does not name the model key %q", ModelKey(DefaultSwarm, "demo"))
	}
}

// TestDocLimits checks that every limit the code enforces appears in the
// doc's limits table with the same number.
func TestDocLimits(t *testing.T) {
	raw, err := os.ReadFile(docPath)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	limits := []struct {
		name  string
		value int64
	}{
		{"MaxRequestFrame", MaxRequestFrame},
		{"MaxEventFrame", MaxEventFrame},
		{"MaxChunkText", MaxChunkText},
		{"MaxAnnounce", MaxAnnounce},
		{"MaxReceiptBatch", MaxReceiptBatch},
		{"MaxReceiptFrame", MaxReceiptFrame},
		{"IDLen", IDLen},
		{"MaxModelName", MaxModelName},
		{"MaxMessages", MaxMessages},
		{"MaxAttachments", MaxAttachments},
		{"MaxMime", MaxMime},
		{"MaxStops", MaxStops},
		{"MaxStopLen", MaxStopLen},
		{"MaxMaxTokens", MaxMaxTokens},
		{"MaxInputs", MaxInputs},
		{"MaxPriority", MaxPriority},
		{"MaxEmbeddingDim", MaxEmbeddingDim},
		{"MaxAnnModels", MaxAnnModels},
		{"MaxAnnGPUs", MaxAnnGPUs},
		{"MaxAnnRoles", MaxAnnRoles},
		{"MaxAnnSlots", MaxAnnSlots},
		{"MaxVersionLen", MaxVersionLen},
		{"MinAnnounceTTL", MinAnnounceTTL.Milliseconds()},
		{"MaxAnnounceTTL", MaxAnnounceTTL.Milliseconds()},
		{"MaxClockSkew", MaxClockSkew.Milliseconds()},
		{"MaxAnnAddrs", MaxAnnAddrs},
		{"MaxAddrLen", MaxAddrLen},
		{"MaxFeatures", MaxFeatures},
		{"MaxFeatureLen", MaxFeatureLen},
		{"MaxContinuation", MaxContinuation},
		{"MaxTools", MaxTools},
		{"MaxToolName", MaxToolName},
		{"MaxToolDesc", MaxToolDesc},
		{"MaxSchema", MaxSchema},
		{"MaxToolCalls", MaxToolCalls},
		{"MaxToolCallID", MaxToolCallID},
		{"MaxToolArguments", MaxToolArguments},
		{"MaxTopLogprobs", MaxTopLogprobs},
		{"MaxChunkLogprobs", MaxChunkLogprobs},
		{"MaxLogprobToken", MaxLogprobToken},
		{"MaxPenalty", MaxPenalty},
		{"MaxFormatName", MaxFormatName},
		{"MinLogprob", MinLogprob},
	}
	for _, l := range limits {
		row := fmt.Sprintf("| `%s` | %d |", l.name, l.value)
		if !strings.Contains(doc, row) {
			t.Errorf("doc lacks the limits row %q", row)
		}
	}
	for _, id := range []string{string(QueryProtocol(DefaultSwarm)), string(QueryProtocol("lab")), AnnounceTopic(DefaultSwarm),
		RelayTopic(DefaultSwarm), RelayKey(DefaultSwarm),
		string(ReceiptProtocol(DefaultSwarm)), string(ReceiptProtocol("lab")), string(ReceiptBatchProtocol(DefaultSwarm)), string(ReceiptBatchProtocol("lab")),
		string(DHTPrefix(DefaultSwarm)) + "/kad/1.0.0"} {
		if !strings.Contains(doc, "`"+id+"`") {
			t.Errorf("doc does not name %q", id)
		}
	}
	for _, f := range []string{FeatureContinue, FeatureTools, FeatureJSONObject, FeatureJSONSchema, FeatureLogprobs} {
		if !strings.Contains(doc, "| `"+f+"` |") {
			t.Errorf("doc lacks the feature row for %q", f)
		}
	}
	for c, name := range pb.ErrorCode_name {
		if c == 0 {
			continue
		}
		code := pb.ErrorCode(c)
		// The row's last column says whether Errorf makes it retryable.
		row := regexp.MustCompile(fmt.Sprintf("(?m)^\\| %d \\| `%s` \\| .* \\| (yes|no) \\|$", c, regexp.QuoteMeta(CodeName(code)))).FindStringSubmatch(doc)
		if row == nil {
			t.Errorf("doc lacks the error code row for %s", name)
			continue
		}
		if want := map[bool]string{true: "yes", false: "no"}[Errorf(code, "").Retryable]; row[1] != want {
			t.Errorf("doc says %s is retryable %q, the code %q", name, row[1], want)
		}
	}
}

// TestDocProto checks that the doc's copy of the schema is the real one.
func TestDocProto(t *testing.T) {
	raw, err := os.ReadFile(docPath)
	if err != nil {
		t.Fatal(err)
	}
	schema, err := os.ReadFile("pb/mtor.proto")
	if err != nil {
		t.Fatal(err)
	}
	block, err := docBlock(string(raw), "<!-- schema: protocol/pb/mtor.proto -->")
	if err != nil {
		t.Fatal(err)
	}
	if block != string(schema) {
		t.Fatal("the schema in docs/protocol.md differs from protocol/pb/mtor.proto; copy the file into the doc")
	}
}

// docBlock returns the body of the first fenced block after marker.
func docBlock(doc, marker string) (string, error) {
	i := strings.Index(doc, marker)
	if i < 0 {
		return "", fmt.Errorf("marker %q not found", marker)
	}
	rest := doc[i+len(marker):]
	open := strings.Index(rest, "```")
	if open < 0 {
		return "", fmt.Errorf("no code block after %q", marker)
	}
	rest = rest[open:]
	nl := strings.IndexByte(rest, '\n')
	if nl < 0 {
		return "", fmt.Errorf("unterminated code block after %q", marker)
	}
	rest = rest[nl+1:]
	end := strings.Index(rest, "```")
	if end < 0 {
		return "", fmt.Errorf("unterminated code block after %q", marker)
	}
	return rest[:end], nil
}

var hexByteRe = regexp.MustCompile(`^[0-9a-f]{2}$`)

// docHexBlock reads the bytes of an example: each line holds hex bytes,
// then optionally a comment starting with '#'.
func docHexBlock(doc, name string) ([]byte, error) {
	block, err := docBlock(doc, "<!-- example: "+name+" -->")
	if err != nil {
		return nil, err
	}
	var out []byte
	for n, line := range strings.Split(block, "\n") {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		for _, tok := range strings.Fields(line) {
			if !hexByteRe.MatchString(tok) {
				return nil, fmt.Errorf("example %q line %d: %q is not a lower-case hex byte", name, n+1, tok)
			}
			b, _ := hex.DecodeString(tok)
			out = append(out, b...)
		}
	}
	return out, nil
}

func hexLines(b []byte) string {
	var sb strings.Builder
	for i := 0; i < len(b); i += 16 {
		fmt.Fprintf(&sb, "%04x  % x\n", i, b[i:min(i+16, len(b))])
	}
	return sb.String()
}

func TestDocRequestDecodes(t *testing.T) {
	// The example is also a frame a client in another language could send:
	// it must decode back to the same request.
	wire, _ := AppendFrame(nil, docRequest())
	got := &pb.QueryRequest{}
	if err := NewFrameReader(bytes.NewReader(wire), MaxRequestFrame).Read(got); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, docRequest()) {
		t.Fatal("example request does not round trip")
	}
}
