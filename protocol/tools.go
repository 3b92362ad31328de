package protocol

import (
	"encoding/json"
	"math"
	"regexp"
	"strings"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Limits of tool calling, structured output and log probabilities.
// docs/protocol.md lists the same.
const (
	MaxTools         = 128
	MaxToolName      = 64
	MaxToolDesc      = 8 << 10
	MaxSchema        = 64 << 10 // a tool's parameters or a response format's schema, as JSON text
	MaxToolCalls     = 64       // per assistant message, and per answer (ToolCallDelta.index)
	MaxToolCallID    = 128
	MaxToolArguments = 256 << 10
	MaxTopLogprobs   = 20
	MaxChunkLogprobs = 1024
	MaxLogprobToken  = 256
	MaxPenalty       = 2
	MaxFormatName    = 64
	MinLogprob       = -9999 // what a worker sends for -Inf, as OpenAI does
)

// Model features a worker announces in ModelInfo.features. A query that
// needs one (RequiredFeatures) goes only to workers announcing it, and a
// worker whose model lacks it answers UNSUPPORTED.
const (
	FeatureTools      = "tools"       // Tool, ToolChoice, tool messages, ToolCallDelta events
	FeatureJSONObject = "json_object" // ResponseFormat type json_object
	FeatureJSONSchema = "json_schema" // ResponseFormat type json_schema
	FeatureLogprobs   = "logprobs"    // Params.logprobs and top_logprobs
)

// Finish reasons of Done.finish_reason.
const (
	FinishStop          = "stop"
	FinishLength        = "length"
	FinishToolCalls     = "tool_calls"
	FinishContentFilter = "content_filter"
)

// ValidFinishReason reports whether s may be sent as Done.finish_reason.
func ValidFinishReason(s string) bool {
	switch s {
	case "", FinishStop, FinishLength, FinishToolCalls, FinishContentFilter:
		return true
	}
	return false
}

var (
	toolNameRe   = regexp.MustCompile(`^[A-Za-z0-9_.:-]{1,64}$`)
	formatNameRe = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)
)

// UsesTools reports whether r carries anything of tool calling: tools, a
// tool choice, a tool message with a tool_call_id or an assistant message
// with tool calls.
func UsesTools(r *pb.QueryRequest) bool {
	if len(r.GetTools()) > 0 || r.GetToolChoice() != nil {
		return true
	}
	for _, m := range r.GetMessages() {
		if len(m.GetToolCalls()) > 0 || m.GetToolCallId() != "" {
			return true
		}
	}
	return false
}

// RequiredFeatures lists the model features a worker needs to answer r
// faithfully, in a fixed order; nil for a plain query.
func RequiredFeatures(r *pb.QueryRequest) []string {
	var fs []string
	if UsesTools(r) {
		fs = append(fs, FeatureTools)
	}
	switch r.GetResponseFormat().GetType() {
	case "json_object":
		fs = append(fs, FeatureJSONObject)
	case "json_schema":
		fs = append(fs, FeatureJSONSchema)
	}
	if r.GetParams().GetLogprobs() {
		fs = append(fs, FeatureLogprobs)
	}
	return fs
}

// schemaField is the field a JSON schema named what ("tools[2].parameters",
// "response_format schema") belongs to.
func schemaField(what string) string {
	if strings.HasPrefix(what, "tools") {
		return "tools"
	}
	return "response_format"
}

// jsonObject checks that s is the JSON text of an object.
func jsonObject(what, s string) error {
	if len(s) > MaxSchema {
		return badField(schemaField(what), "%s is %d bytes, limit %d", what, len(s), MaxSchema)
	}
	var v map[string]any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		return badField(schemaField(what), "%s is not a JSON object: %v", what, err)
	}
	return nil
}

func validateTools(r *pb.QueryRequest) error {
	if len(r.GetTools()) > MaxTools {
		return badField("tools", "%d tools, limit %d", len(r.GetTools()), MaxTools)
	}
	names := map[string]bool{}
	for i, t := range r.GetTools() {
		if !toolNameRe.MatchString(t.GetName()) {
			return badField("tools", "tools[%d]: name %q must match %s", i, clip(t.GetName()), toolNameRe)
		}
		if names[t.GetName()] {
			return badField("tools", "tools[%d]: name %q given twice", i, t.GetName())
		}
		names[t.GetName()] = true
		if len(t.GetDescription()) > MaxToolDesc {
			return badField("tools", "tools[%d]: description of %d bytes, limit %d", i, len(t.GetDescription()), MaxToolDesc)
		}
		if t.GetParameters() != "" {
			if err := jsonObject("tools["+itoa(i)+"].parameters", t.GetParameters()); err != nil {
				return err
			}
		}
	}
	if c := r.GetToolChoice(); c != nil {
		switch c.GetMode() {
		case "auto", "none":
		case "required":
			if len(r.GetTools()) == 0 {
				return badField("tool_choice", "tool_choice required without tools")
			}
		case "function":
			if !names[c.GetName()] {
				return badField("tool_choice", "tool_choice names %q, which is not among the tools", clip(c.GetName()))
			}
		default:
			return badField("tool_choice", "tool_choice mode %q (want auto, none, required or function)", clip(c.GetMode()))
		}
		if c.GetMode() != "function" && c.GetName() != "" {
			return badField("tool_choice", "tool_choice name is only for mode function")
		}
	}
	for i, m := range r.GetMessages() {
		if len(m.GetToolCalls()) > 0 && m.GetRole() != "assistant" {
			return badField("messages", "messages[%d]: only assistant messages hold tool calls", i)
		}
		if len(m.GetToolCalls()) > MaxToolCalls {
			return badField("messages", "messages[%d]: %d tool calls, limit %d", i, len(m.GetToolCalls()), MaxToolCalls)
		}
		for j, c := range m.GetToolCalls() {
			if c.GetId() == "" || len(c.GetId()) > MaxToolCallID {
				return badField("messages", "messages[%d].tool_calls[%d]: id must be 1-%d bytes", i, j, MaxToolCallID)
			}
			if !toolNameRe.MatchString(c.GetName()) {
				return badField("messages", "messages[%d].tool_calls[%d]: invalid name %q", i, j, clip(c.GetName()))
			}
			if len(c.GetArguments()) > MaxToolArguments {
				return badField("messages", "messages[%d].tool_calls[%d]: arguments of %d bytes, limit %d", i, j, len(c.GetArguments()), MaxToolArguments)
			}
		}
		if m.GetToolCallId() != "" && m.GetRole() != "tool" {
			return badField("messages", "messages[%d]: only tool messages answer a tool call", i)
		}
		if len(m.GetToolCallId()) > MaxToolCallID {
			return badField("messages", "messages[%d]: tool_call_id over %d bytes", i, MaxToolCallID)
		}
		if m.GetName() != "" && !toolNameRe.MatchString(m.GetName()) {
			return badField("messages", "messages[%d]: invalid name %q", i, clip(m.GetName()))
		}
	}
	return nil
}

func validateResponseFormat(f *pb.ResponseFormat) error {
	if f == nil {
		return nil
	}
	switch f.GetType() {
	case "text", "json_object":
		if f.GetName() != "" || f.GetSchema() != "" || f.GetStrict() {
			return badField("response_format", "response_format %s takes no name, schema or strict", f.GetType())
		}
	case "json_schema":
		if f.GetName() != "" && !formatNameRe.MatchString(f.GetName()) {
			return badField("response_format", "response_format name %q must match %s", clip(f.GetName()), formatNameRe)
		}
		if err := jsonObject("response_format schema", f.GetSchema()); err != nil {
			return err
		}
	default:
		return badField("response_format", "response_format type %q (want text, json_object or json_schema)", clip(f.GetType()))
	}
	return nil
}

func validatePenalty(name string, v *float32) error {
	if v == nil {
		return nil
	}
	if f := float64(*v); math.IsNaN(f) || f < -MaxPenalty || f > MaxPenalty {
		return badField(name, "%s %v out of range [-%d, %d]", name, *v, MaxPenalty, MaxPenalty)
	}
	return nil
}

func validateSamplingExtras(p *pb.Params) error {
	if err := validatePenalty("presence_penalty", p.PresencePenalty); err != nil {
		return err
	}
	if err := validatePenalty("frequency_penalty", p.FrequencyPenalty); err != nil {
		return err
	}
	if p.GetTopLogprobs() > MaxTopLogprobs {
		return badField("top_logprobs", "top_logprobs %d over limit %d", p.GetTopLogprobs(), MaxTopLogprobs)
	}
	if p.GetTopLogprobs() > 0 && !p.GetLogprobs() {
		return badField("top_logprobs", "top_logprobs needs logprobs")
	}
	return nil
}

func validLogprob(f float32) bool {
	return !math.IsNaN(float64(f)) && f <= 0 && f >= MinLogprob
}

func validateLogprobs(lps []*pb.TokenLogprob) error {
	if len(lps) > MaxChunkLogprobs {
		return badRequest("chunk with %d logprobs, limit %d", len(lps), MaxChunkLogprobs)
	}
	for _, lp := range lps {
		if len(lp.GetToken()) > MaxLogprobToken || len(lp.GetBytes()) > MaxLogprobToken || !validLogprob(lp.GetLogprob()) {
			return badRequest("invalid token logprob")
		}
		if len(lp.GetTop()) > MaxTopLogprobs {
			return badRequest("%d top logprobs, limit %d", len(lp.GetTop()), MaxTopLogprobs)
		}
		for _, t := range lp.GetTop() {
			if len(t.GetToken()) > MaxLogprobToken || len(t.GetBytes()) > MaxLogprobToken || !validLogprob(t.GetLogprob()) {
				return badRequest("invalid top logprob")
			}
		}
	}
	return nil
}

func validateToolCallDelta(d *pb.ToolCallDelta) error {
	if d.GetIndex() >= MaxToolCalls {
		return badRequest("tool call index %d, limit %d", d.GetIndex(), MaxToolCalls-1)
	}
	if len(d.GetId()) > MaxToolCallID || len(d.GetName()) > MaxToolName {
		return badRequest("tool call id or name too long")
	}
	if len(d.GetArguments()) > MaxChunkText {
		return badRequest("tool call fragment of %d bytes, limit %d", len(d.GetArguments()), MaxChunkText)
	}
	return nil
}

// ValidToolName reports whether name is one a tool may have (and a tool
// call name, which a client sends back in its next turn).
func ValidToolName(name string) bool { return toolNameRe.MatchString(name) }

// clip shortens s for an error message.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

func itoa(i int) string {
	b, _ := json.Marshal(i)
	return string(b)
}
