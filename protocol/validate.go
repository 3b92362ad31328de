package protocol

import (
	"math"
	"regexp"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Field limits enforced by validation. docs/protocol.md lists the same.
const (
	IDLen          = 16
	MaxModelName   = 128
	MaxMessages    = 256
	MaxAttachments = 8
	MaxMime        = 128
	MaxStops       = 8
	MaxStopLen     = 64
	MaxMaxTokens   = 1 << 20
	MaxInputs      = 256
	MaxPriority    = 10
	MaxAnnModels   = 256
	MaxAnnGPUs     = 16
	MaxAnnRoles    = 8
	MaxVersionLen  = 64
	MinAnnounceTTL = time.Second
	MaxAnnounceTTL = 10 * time.Minute
	MaxClockSkew   = 30 * time.Second
	// MaxQueryDeadline is the longest a worker lets a query run from
	// when it read the request, whatever its deadline_unix_ms (§8).
	MaxQueryDeadline = 10 * time.Minute
	MaxEmbeddingDim  = 1 << 16
	MaxAnnAddrs      = 16
	MaxAddrLen       = 256
	MaxFeatures      = 16
	MaxFeatureLen    = 32
	// MaxAnnSlots bounds a worker's announced concurrency and queue (and
	// what it reports in them): a router sums them for admission and
	// takes queue positions below them as progress.
	MaxAnnSlots = 1 << 14
	// MaxContinuation bounds the answer text a continuation carries.
	MaxContinuation = 1 << 20
)

// FeatureContinue is the model feature of a worker that accepts
// QueryRequest.continuation.
const FeatureContinue = "continue"

var sizeRe = regexp.MustCompile(`^[1-9][0-9]{0,3}x[1-9][0-9]{0,3}$`)

func badRequest(format string, args ...any) *Error { return Errorf(CodeBadRequest, format, args...) }

// badField is a BAD_REQUEST about the request's field (its name in
// docs/protocol.md, top level: "messages", "max_tokens").
func badField(field, format string, args ...any) *Error {
	e := badRequest(format, args...)
	e.Field = field
	return e
}

// attachmentField is the field an attachment of where ("messages", or
// the request's own) belongs to.
func attachmentField(where string) string {
	if where == "messages" {
		return where
	}
	return "attachments"
}

// ValidateModelName checks a model name: 1-128 bytes, no control characters.
func ValidateModelName(name string) error {
	if name == "" {
		return badField("model", "model is required")
	}
	if len(name) > MaxModelName {
		return badField("model", "model name is %d bytes, limit %d", len(name), MaxModelName)
	}
	if strings.IndexFunc(name, unicode.IsControl) >= 0 {
		return badField("model", "model name contains control characters")
	}
	return nil
}

func validateAttachment(where string, a *pb.Attachment) error {
	if a.GetMime() == "" || len(a.GetMime()) > MaxMime || strings.ContainsAny(a.GetMime(), " \r\n") {
		return badField(attachmentField(where), "%s: attachment mime %q is invalid", where, a.GetMime())
	}
	if len(a.GetData()) == 0 {
		return badField(attachmentField(where), "%s: attachment of type %s is empty", where, a.GetMime())
	}
	return nil
}

// validatePlaces checks where message i's attachments stand in its
// content: every one placed or none, in order, within the content.
func validatePlaces(i int, m *pb.Message) error {
	atts := m.GetAttachments()
	if len(atts) == 0 || atts[0].At == nil {
		for _, a := range atts {
			if a.At != nil {
				return badField("messages", "messages[%d]: some attachments have a place (at) and some not", i)
			}
		}
		return nil
	}
	last := uint32(0)
	for j, a := range atts {
		switch {
		case a.At == nil:
			return badField("messages", "messages[%d]: some attachments have a place (at) and some not", i)
		case a.GetAt() < last:
			return badField("messages", "messages[%d]: attachment %d stands at %d, before the one ahead of it (%d)", i, j, a.GetAt(), last)
		case int64(a.GetAt()) > int64(len(m.GetContent())):
			return badField("messages", "messages[%d]: attachment %d stands at %d, past the content's %d bytes", i, j, a.GetAt(), len(m.GetContent()))
		case int(a.GetAt()) < len(m.GetContent()) && !utf8.RuneStart(m.GetContent()[a.GetAt()]):
			return badField("messages", "messages[%d]: attachment %d stands at %d, inside a UTF-8 character", i, j, a.GetAt())
		}
		last = a.GetAt()
	}
	return nil
}

// hasAttachment reports whether any attachment (request- or message-level)
// has a mime type with the given prefix.
func hasAttachment(r *pb.QueryRequest, prefix string) bool {
	for _, a := range r.GetAttachments() {
		if strings.HasPrefix(a.GetMime(), prefix) {
			return true
		}
	}
	for _, m := range r.GetMessages() {
		for _, a := range m.GetAttachments() {
			if strings.HasPrefix(a.GetMime(), prefix) {
				return true
			}
		}
	}
	return false
}

// ValidateRequest checks every field of a query request and returns a
// BAD_REQUEST error naming the first problem.
func ValidateRequest(r *pb.QueryRequest) error {
	if r == nil {
		return badRequest("empty request")
	}
	if len(r.GetId()) != IDLen {
		return badField("id", "id must be %d bytes, got %d", IDLen, len(r.GetId()))
	}
	t := r.GetType()
	if t <= pb.QueryType_QUERY_TYPE_UNSPECIFIED || int(t) >= len(typeNames) {
		return badField("type", "unknown query type %d", t)
	}
	if err := ValidateModelName(r.GetModel()); err != nil {
		return err
	}
	if len(r.GetMessages()) > MaxMessages {
		return badField("messages", "%d messages, limit %d", len(r.GetMessages()), MaxMessages)
	}
	for i, m := range r.GetMessages() {
		switch m.GetRole() {
		case "system", "user", "assistant", "tool":
		default:
			return badField("messages", "messages[%d]: unknown role %q", i, m.GetRole())
		}
		if len(m.GetAttachments()) > MaxAttachments {
			return badField("messages", "messages[%d]: %d attachments, limit %d", i, len(m.GetAttachments()), MaxAttachments)
		}
		for _, a := range m.GetAttachments() {
			if err := validateAttachment("messages", a); err != nil {
				return err
			}
		}
		if err := validatePlaces(i, m); err != nil {
			return err
		}
	}
	if len(r.GetAttachments()) > MaxAttachments {
		return badField("attachments", "%d attachments, limit %d", len(r.GetAttachments()), MaxAttachments)
	}
	for _, a := range r.GetAttachments() {
		if a.At != nil {
			return badField("attachments", "request: an attachment's place (at) is for a message's attachments only")
		}
		if err := validateAttachment("request", a); err != nil {
			return err
		}
	}
	if len(r.GetInputs()) > MaxInputs {
		return badField("inputs", "%d inputs, limit %d", len(r.GetInputs()), MaxInputs)
	}
	if err := validateParams(r.GetParams()); err != nil {
		return err
	}
	if err := validateTools(r); err != nil {
		return err
	}
	if err := validateResponseFormat(r.GetResponseFormat()); err != nil {
		return err
	}
	if r.GetDeadlineUnixMs() < 0 {
		return badField("deadline_unix_ms", "negative deadline")
	}
	if c := r.GetContinuation(); c != "" {
		if len(c) > MaxContinuation {
			return badField("continuation", "continuation of %d bytes, limit %d", len(c), MaxContinuation)
		}
		if t := r.GetType(); t != pb.QueryType_QUERY_TYPE_CHAT && t != pb.QueryType_QUERY_TYPE_VISION {
			return badField("continuation", "a %s query cannot be continued", TypeName(t))
		}
	}
	if p := r.GetPriority(); p < -MaxPriority || p > MaxPriority {
		return badField("priority", "priority %d out of range [-%d, %d]", p, MaxPriority, MaxPriority)
	}
	return validateInputForType(r)
}

func hasText(r *pb.QueryRequest) bool {
	if strings.TrimSpace(r.GetPrompt()) != "" {
		return true
	}
	for _, m := range r.GetMessages() {
		if strings.TrimSpace(m.GetContent()) != "" {
			return true
		}
	}
	return false
}

// validateInputForType checks that the request carries the input its type
// needs, so that a worker never starts a backend call that must fail.
func validateInputForType(r *pb.QueryRequest) error {
	switch r.GetType() {
	case pb.QueryType_QUERY_TYPE_CHAT, pb.QueryType_QUERY_TYPE_IMAGINE, pb.QueryType_QUERY_TYPE_TTS:
		if !hasText(r) {
			field := "prompt"
			if r.GetType() == pb.QueryType_QUERY_TYPE_CHAT {
				field = "messages"
			}
			return badField(field, "%s query needs a prompt or messages", TypeName(r.GetType()))
		}
	case pb.QueryType_QUERY_TYPE_VISION:
		if !hasAttachment(r, "image/") {
			return badField("attachments", "vision query needs an image attachment")
		}
	case pb.QueryType_QUERY_TYPE_STT:
		if !hasAttachment(r, "audio/") && !hasAttachment(r, "video/webm") {
			return badField("attachments", "stt query needs an audio attachment")
		}
	case pb.QueryType_QUERY_TYPE_EMBED:
		if len(r.GetInputs()) == 0 && strings.TrimSpace(r.GetPrompt()) == "" {
			return badField("inputs", "embed query needs inputs or a prompt")
		}
	}
	return nil
}

func validateParams(p *pb.Params) error {
	if p == nil {
		return nil
	}
	if p.GetMaxTokens() > MaxMaxTokens {
		return badField("max_tokens", "max_tokens %d over limit %d", p.GetMaxTokens(), MaxMaxTokens)
	}
	if p.Temperature != nil && (p.GetTemperature() < 0 || p.GetTemperature() > 2 || p.GetTemperature() != p.GetTemperature()) {
		return badField("temperature", "temperature %v out of range [0, 2]", p.GetTemperature())
	}
	if p.TopP != nil && (p.GetTopP() < 0 || p.GetTopP() > 1 || p.GetTopP() != p.GetTopP()) {
		return badField("top_p", "top_p %v out of range [0, 1]", p.GetTopP())
	}
	if len(p.GetStop()) > MaxStops {
		return badField("stop", "%d stop sequences, limit %d", len(p.GetStop()), MaxStops)
	}
	for _, s := range p.GetStop() {
		if s == "" || len(s) > MaxStopLen {
			return badField("stop", "stop sequence must be 1-%d bytes", MaxStopLen)
		}
	}
	if p.GetSize() != "" && !sizeRe.MatchString(p.GetSize()) {
		return badField("size", "size %q must be WIDTHxHEIGHT, each 1-9999", p.GetSize())
	}
	if len(p.GetVoice()) > 64 {
		return badField("voice", "voice of %d bytes, limit 64", len(p.GetVoice()))
	}
	if len(p.GetFormat()) > 32 {
		return badField("format", "format of %d bytes, limit 32", len(p.GetFormat()))
	}
	return validateSamplingExtras(p)
}

// ValidateEventFor checks that e may answer req: a tool call only a query
// that offers tools, media only an imagine or a text-to-speech query, an
// embedding only an embed query. A worker sending anything else breaks
// the protocol (a chat client shown a tool call it never offered, or
// nothing at all where its answer should be).
func ValidateEventFor(req *pb.QueryRequest, e *pb.Event) error {
	switch e.GetKind().(type) {
	case *pb.Event_ToolCall:
		if len(req.GetTools()) == 0 {
			return badRequest("tool call in answer to a query that offers no tools")
		}
	case *pb.Event_Media:
		if t := req.GetType(); t != pb.QueryType_QUERY_TYPE_IMAGINE && t != pb.QueryType_QUERY_TYPE_TTS {
			return badRequest("media in answer to a %s query", TypeName(t))
		}
	case *pb.Event_Embedding:
		if t := req.GetType(); t != pb.QueryType_QUERY_TYPE_EMBED {
			return badRequest("embedding in answer to a %s query", TypeName(t))
		}
	}
	return nil
}

// ValidateEvent checks an event received from a worker.
func ValidateEvent(e *pb.Event) error {
	switch k := e.GetKind().(type) {
	case *pb.Event_Accepted:
	case *pb.Event_Chunk:
		if len(k.Chunk.GetText()) > MaxChunkText {
			return badRequest("chunk of %d bytes, limit %d", len(k.Chunk.GetText()), MaxChunkText)
		}
		return validateLogprobs(k.Chunk.GetLogprobs())
	case *pb.Event_ToolCall:
		return validateToolCallDelta(k.ToolCall)
	case *pb.Event_Media:
		if k.Media.GetMime() == "" || len(k.Media.GetMime()) > MaxMime {
			return badRequest("media event without a valid mime type")
		}
	case *pb.Event_Embedding:
		if len(k.Embedding.GetVector()) > MaxEmbeddingDim {
			return badRequest("embedding of dimension %d, limit %d", len(k.Embedding.GetVector()), MaxEmbeddingDim)
		}
	case *pb.Event_Done:
		if !ValidFinishReason(k.Done.GetFinishReason()) {
			return badRequest("done with unknown finish reason %q", clip(k.Done.GetFinishReason()))
		}
	case *pb.Event_Error:
		if _, ok := pb.ErrorCode_name[int32(k.Error.GetCode())]; !ok || k.Error.GetCode() == pb.ErrorCode_ERROR_CODE_UNSPECIFIED {
			return badRequest("error event with unknown code %d", k.Error.GetCode())
		}
	default:
		return badRequest("event with no kind")
	}
	return nil
}

// validateStamp checks the time and TTL of a gossiped message of kind
// (announce, catalog): not dated beyond MaxClockSkew in the future, a TTL
// within [minTTL, maxTTL].
func validateStamp(kind string, unixMs int64, ttlMs uint32, minTTL, maxTTL time.Duration, now time.Time) error {
	t := time.UnixMilli(unixMs)
	if t.After(now.Add(MaxClockSkew)) {
		return badRequest("%s is dated %s in the future", kind, t.Sub(now).Round(time.Millisecond))
	}
	ttl := time.Duration(ttlMs) * time.Millisecond
	if ttl < minTTL || ttl > maxTTL {
		return badRequest("%s ttl %s out of range [%s, %s]", kind, ttl, minTTL, maxTTL)
	}
	return nil
}

// ValidateAnnounce checks an announcement against now; it does not judge
// sequence numbers, which need per-peer state.
func ValidateAnnounce(a *pb.Announce, now time.Time) error {
	if a.GetSeq() == 0 {
		return badRequest("announce seq must be > 0")
	}
	if err := validateStamp("announce", a.GetTimeUnixMs(), a.GetTtlMs(), MinAnnounceTTL, MaxAnnounceTTL, now); err != nil {
		return err
	}
	if len(a.GetRoles()) > MaxAnnRoles {
		return badRequest("%d roles, limit %d", len(a.GetRoles()), MaxAnnRoles)
	}
	for _, r := range a.GetRoles() {
		if r == "" || len(r) > 32 {
			return badRequest("invalid role %q", r)
		}
	}
	if len(a.GetVersion()) > MaxVersionLen {
		return badRequest("version too long")
	}
	if len(a.GetModels()) > MaxAnnModels {
		return badRequest("%d models, limit %d", len(a.GetModels()), MaxAnnModels)
	}
	// A name listed twice would count twice toward the bounded number of
	// workers a node keeps per model.
	seen := make(map[string]bool, len(a.GetModels()))
	for _, m := range a.GetModels() {
		if err := ValidateModelName(m.GetName()); err != nil {
			return err
		}
		if seen[m.GetName()] {
			return badRequest("model %q announced twice", m.GetName())
		}
		seen[m.GetName()] = true
		if len(m.GetTypes()) == 0 || len(m.GetTypes()) > len(typeNames)-1 {
			return badRequest("model %q announces %d types", m.GetName(), len(m.GetTypes()))
		}
		for _, t := range m.GetTypes() {
			if t <= 0 || int(t) >= len(typeNames) {
				return badRequest("model %q announces unknown type %d", m.GetName(), t)
			}
		}
		// Routing divides and compares by these: NaN and Inf would let one
		// peer attract (or poison) every score.
		if !finiteNonNeg(m.GetTokensPerSec()) || !finiteNonNeg(m.GetJoulesPerToken()) {
			return badRequest("model %q announces invalid figures", m.GetName())
		}
		if len(m.GetBackend()) > 32 {
			return badRequest("backend name too long")
		}
		if len(m.GetFeatures()) > MaxFeatures {
			return badRequest("model %q announces %d features, limit %d", m.GetName(), len(m.GetFeatures()), MaxFeatures)
		}
		for _, f := range m.GetFeatures() {
			if f == "" || len(f) > MaxFeatureLen {
				return badRequest("model %q announces an invalid feature", m.GetName())
			}
		}
	}
	if len(a.GetAddrs()) > MaxAnnAddrs {
		return badRequest("%d addresses, limit %d", len(a.GetAddrs()), MaxAnnAddrs)
	}
	for _, ad := range a.GetAddrs() {
		if len(ad) == 0 || len(ad) > MaxAddrLen {
			return badRequest("invalid address of %d bytes", len(ad))
		}
	}
	if len(a.GetGpus()) > MaxAnnGPUs {
		return badRequest("%d gpus, limit %d", len(a.GetGpus()), MaxAnnGPUs)
	}
	for _, g := range a.GetGpus() {
		if len(g.GetName()) > 128 || len(g.GetUuid()) > 128 || g.GetUtilPercent() > 100 {
			return badRequest("invalid gpu entry")
		}
	}
	if a.GetHealth() > 100 {
		return badRequest("health %d over 100", a.GetHealth())
	}
	if l := a.GetLoad(); l.GetMaxConcurrency() > MaxAnnSlots || l.GetMaxQueue() > MaxAnnSlots || l.GetInFlight() > MaxAnnSlots || l.GetQueued() > MaxAnnSlots {
		return badRequest("load beyond %d slots", MaxAnnSlots)
	}
	// A missing load reads as max_concurrency 0, which routing cannot use.
	if len(a.GetModels()) > 0 && a.GetLoad().GetMaxConcurrency() == 0 {
		return badRequest("worker with models announces max_concurrency 0")
	}
	return nil
}

// finiteNonNeg reports whether f is a finite number >= 0.
func finiteNonNeg(f float32) bool {
	return f >= 0 && !math.IsInf(float64(f), 1)
}
