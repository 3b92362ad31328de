package bridge

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"mime"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// chatRequest is the body of POST /v1/chat/completions, the fields the
// bridge reads. Polymorphic fields stay raw and are decoded afterwards so
// that an error can name the exact field.
type chatRequest struct {
	Model               string          `json:"model"`
	Messages            []chatMessage   `json:"messages"`
	Stream              bool            `json:"stream"`
	StreamOptions       *streamOptions  `json:"stream_options"`
	MaxTokens           *int64          `json:"max_tokens"`
	MaxCompletionTokens *int64          `json:"max_completion_tokens"`
	Temperature         *float64        `json:"temperature"`
	TopP                *float64        `json:"top_p"`
	Stop                json.RawMessage `json:"stop"`
	Seed                *int64          `json:"seed"`
	N                   *int64          `json:"n"`
	PresencePenalty     *float64        `json:"presence_penalty"`
	FrequencyPenalty    *float64        `json:"frequency_penalty"`
	Logprobs            *bool           `json:"logprobs"`
	TopLogprobs         *int64          `json:"top_logprobs"`
	Tools               []chatTool      `json:"tools"`
	ToolChoice          json.RawMessage `json:"tool_choice"`
	ParallelToolCalls   *bool           `json:"parallel_tool_calls"`
	ResponseFormat      json.RawMessage `json:"response_format"`
	// Fields the swarm cannot honour: refused with 400 when set, never
	// silently dropped.
	LogitBias    map[string]float64 `json:"logit_bias"`
	Functions    json.RawMessage    `json:"functions"`
	FunctionCall json.RawMessage    `json:"function_call"`
	Audio        json.RawMessage    `json:"audio"`
	Modalities   []string           `json:"modalities"`
	Prediction   json.RawMessage    `json:"prediction"`
}

// chatTool is one entry of "tools".
type chatTool struct {
	Type     string `json:"type"`
	Function *struct {
		Name        string          `json:"name"`
		Description string          `json:"description"`
		Parameters  json.RawMessage `json:"parameters"`
		Strict      *bool           `json:"strict"`
	} `json:"function"`
}

// chatToolCall is a tool call in an assistant message, and (with Index)
// in a streamed delta.
type chatToolCall struct {
	Index    *int   `json:"index,omitempty"`
	ID       string `json:"id,omitempty"`
	Type     string `json:"type,omitempty"`
	Function struct {
		Name      string `json:"name,omitempty"`
		Arguments string `json:"arguments"`
	} `json:"function"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type chatMessage struct {
	Role       string         `json:"role"`
	Content    messageContent `json:"content"`
	ToolCalls  []chatToolCall `json:"tool_calls"`
	ToolCallID string         `json:"tool_call_id"`
	Name       string         `json:"name"`
}

// contentKind is what a message's content was in the request.
type contentKind int

const (
	contentNull    contentKind = iota // null or absent
	contentText                       // a string
	contentParts                      // an array of content parts
	contentInvalid                    // anything else
)

// messageContent is a message's content, decoded where the request body
// is decoded rather than kept as raw JSON to decode later, which copied a
// large image's text once per step: an image's data: URL is decoded
// straight from the body's bytes (dataURLField).
type messageContent struct {
	kind  contentKind
	text  string
	parts []contentPart
	// badPart is the index of the first part that is not an object with a
	// string "type", when hasBad.
	badPart int
	hasBad  bool
}

// UnmarshalJSON never fails: what is wrong is recorded for
// translateMessage, which names the field in its error.
func (c *messageContent) UnmarshalJSON(b []byte) error {
	*c = messageContent{}
	switch t := bytes.TrimLeft(b, " \t\r\n"); {
	case len(t) == 0 || t[0] == 'n':
		if json.Unmarshal(t, new(any)) != nil {
			c.kind = contentInvalid
		}
	case t[0] == '"':
		c.kind = contentText
		if json.Unmarshal(t, &c.text) != nil {
			c.kind = contentInvalid
		}
	case t[0] == '[':
		c.kind = contentParts
		if err := json.Unmarshal(t, &c.parts); err != nil {
			c.parts, c.hasBad = nil, true
			var raws []json.RawMessage // only on this error path
			if json.Unmarshal(t, &raws) != nil {
				c.kind, c.hasBad = contentInvalid, false
				return nil
			}
			for j, raw := range raws {
				var p contentPart
				if json.Unmarshal(raw, &p) != nil {
					c.badPart = j
					break
				}
			}
		}
	default:
		c.kind = contentInvalid
	}
	return nil
}

// contentPart is one element of an array content.
type contentPart struct {
	Type     string       `json:"type"`
	Text     string       `json:"text"`
	ImageURL imageURLPart `json:"image_url"`
	Refusal  string       `json:"refusal"`
}

// imageURLPart is an image_url value, {"url": "..."} or a bare string.
type imageURLPart struct {
	ok  bool // present and of a valid shape
	url dataURLField
}

func (u *imageURLPart) UnmarshalJSON(b []byte) error {
	var o struct {
		URL dataURLField `json:"url"`
	}
	if err := json.Unmarshal(b, &o); err == nil {
		*u = imageURLPart{ok: true, url: o.URL}
		return nil
	}
	var d dataURLField
	if err := json.Unmarshal(b, &d); err == nil {
		*u = imageURLPart{ok: true, url: d}
		return nil
	}
	*u = imageURLPart{}
	return nil
}

// dataURLProblem is what is wrong with a data: URL.
type dataURLProblem int

const (
	dataURLOK           dataURLProblem = iota
	dataURLNotData                     // not a data: URL (a remote URL, say)
	dataURLNotBase64                   // a data: URL without ;base64
	dataURLBadMediaType                // its media type does not parse
	dataURLBadBase64                   // its data is not base64
	dataURLTooLarge                    // more than any query carries: not decoded
)

// dataURLField is a "data:<mime>;base64,<data>" URL, decoded as the request
// body is decoded: the base64 text is read from the body's own bytes
// (unless JSON escapes are in it), so that the image is held once,
// decoded, and never as a string besides. What is wrong is recorded for
// imagePart, which knows the field and the media left.
type dataURLField struct {
	given   bool // a non-empty string
	mime    string
	data    []byte
	size    int64 // decoded size, from the base64 length
	problem dataURLProblem
}

var errNotString = errors.New("not a string")

func (d *dataURLField) UnmarshalJSON(b []byte) error {
	*d = dataURLField{}
	if string(b) == "null" {
		return nil
	}
	if len(b) < 2 || b[0] != '"' {
		return errNotString
	}
	raw := b[1 : len(b)-1]
	if bytes.IndexByte(raw, '\\') >= 0 { // escaped (some encoders write \/): unquote
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		raw = []byte(s)
	}
	if len(raw) == 0 {
		return nil
	}
	d.given = true
	d.parse(raw)
	return nil
}

// parse decodes raw, the URL's text; raw is not kept.
func (d *dataURLField) parse(raw []byte) {
	rest, ok := bytes.CutPrefix(raw, []byte("data:"))
	if !ok {
		d.problem = dataURLNotData
		return
	}
	meta, payload, ok := bytes.Cut(rest, []byte(","))
	if !ok || !bytes.HasSuffix(meta, []byte(";base64")) {
		d.problem = dataURLNotBase64
		return
	}
	mt, _, err := mime.ParseMediaType(string(bytes.TrimSuffix(meta, []byte(";base64"))))
	if err != nil {
		d.problem = dataURLBadMediaType
		return
	}
	d.mime = mt
	// Padded and unpadded standard base64 are both accepted.
	enc := base64.StdEncoding
	if !bytes.HasSuffix(payload, []byte("=")) && len(payload)%4 != 0 {
		enc = base64.RawStdEncoding
	}
	d.size = int64(enc.DecodedLen(len(payload)))
	if d.size > protocol.MaxRequestFrame {
		d.problem = dataURLTooLarge
		return
	}
	data := make([]byte, d.size)
	n, err := enc.Decode(data, payload)
	if err != nil {
		d.problem = dataURLBadBase64
		return
	}
	d.data = data[:n]
}

// newID is a fresh 16-byte query id.
func newID() []byte {
	id := make([]byte, protocol.IDLen)
	_, _ = rand.Read(id) // crypto/rand.Read never fails (Go >= 1.24)
	return id
}

// limits bound what one request may carry.
type limits struct {
	maxMedia int64
}

// chatToQuery translates a chat request. The query is VISION when any
// message carries an image, CHAT otherwise.
func chatToQuery(req *chatRequest, lim limits) (*pb.QueryRequest, *apiError) {
	if strings.TrimSpace(req.Model) == "" {
		return nil, badRequest("model", "missing_required_parameter", "Missing required parameter: 'model'.")
	}
	if len(req.Messages) == 0 {
		return nil, badRequest("messages", "missing_required_parameter", "Missing required parameter: 'messages' (a non-empty array).")
	}
	if len(req.Messages) > protocol.MaxMessages {
		return nil, badRequest("messages", "invalid_value", "Too many messages: %d, limit %d.", len(req.Messages), protocol.MaxMessages)
	}
	if req.N != nil && *req.N != 1 {
		return nil, badRequest("n", "unsupported_value", "Only n=1 is supported.")
	}
	if err := refuseUnsupported(req); err != nil {
		return nil, err
	}
	q := &pb.QueryRequest{Id: newID(), Type: pb.QueryType_QUERY_TYPE_CHAT, Model: req.Model}
	var media int64
	for i, m := range req.Messages {
		pm, size, err := translateMessage(i, m, lim.maxMedia-media)
		if err != nil {
			return nil, err
		}
		media += size
		if len(pm.Attachments) > 0 {
			q.Type = pb.QueryType_QUERY_TYPE_VISION
		}
		q.Messages = append(q.Messages, pm)
	}
	params, err := chatParams(req)
	if err != nil {
		return nil, err
	}
	q.Params = params
	if err := chatTools(req, q); err != nil {
		return nil, err
	}
	f, err := responseFormat(req.ResponseFormat)
	if err != nil {
		return nil, err
	}
	q.ResponseFormat = f
	// The protocol's own rules (names, schema sizes, ids) are checked here,
	// so that their errors are 400s naming the request, not worker errors.
	if perr := protocol.ValidateRequest(q); perr != nil {
		if pe := protocol.AsError(perr); pe.Code == protocol.CodeBadRequest {
			return nil, invalidRequest(pe, q.GetType())
		}
	}
	return q, nil
}

// refuseUnsupported answers 400 for OpenAI fields the swarm cannot honour,
// instead of ignoring them.
func refuseUnsupported(req *chatRequest) *apiError {
	switch {
	case len(req.LogitBias) > 0:
		return badRequest("logit_bias", "unsupported_parameter", "'logit_bias' is not supported by this swarm.")
	case !isNull(req.Functions) || !isNull(req.FunctionCall):
		return badRequest("functions", "unsupported_parameter", "'functions' and 'function_call' are not supported; use 'tools' and 'tool_choice'.")
	case !isNull(req.Audio):
		return badRequest("audio", "unsupported_parameter", "Audio output is not supported by chat completions here.")
	case !isNull(req.Prediction):
		return badRequest("prediction", "unsupported_parameter", "'prediction' is not supported by this swarm.")
	case req.ParallelToolCalls != nil && !*req.ParallelToolCalls:
		return badRequest("parallel_tool_calls", "unsupported_value", "'parallel_tool_calls': false cannot be enforced by this swarm.")
	}
	for _, m := range req.Modalities {
		if m != "text" {
			return badRequest("modalities", "unsupported_value", "Only the text modality is supported, not %q.", m)
		}
	}
	return nil
}

// chatTools translates tools and tool_choice.
func chatTools(req *chatRequest, q *pb.QueryRequest) *apiError {
	if len(req.Tools) > protocol.MaxTools {
		return badRequest("tools", "invalid_value", "Too many tools: %d, limit %d.", len(req.Tools), protocol.MaxTools)
	}
	for i, t := range req.Tools {
		field := fmt.Sprintf("tools[%d]", i)
		if t.Type != "function" {
			return badRequest(field+".type", "unsupported_value", "Tool type %q is not supported (want function).", t.Type)
		}
		if t.Function == nil || t.Function.Name == "" {
			return badRequest(field+".function.name", "missing_required_parameter", "Missing required parameter: '%s.function.name'.", field)
		}
		pt := &pb.Tool{Name: t.Function.Name, Description: t.Function.Description, Strict: t.Function.Strict != nil && *t.Function.Strict}
		if !isNull(t.Function.Parameters) {
			var obj map[string]any
			if json.Unmarshal(t.Function.Parameters, &obj) != nil {
				return badRequest(field+".function.parameters", "invalid_type", "Invalid type for '%s.function.parameters': expected a JSON Schema object.", field)
			}
			pt.Parameters = compact(t.Function.Parameters)
		}
		q.Tools = append(q.Tools, pt)
	}
	if isNull(req.ToolChoice) {
		return nil
	}
	var mode string
	if json.Unmarshal(req.ToolChoice, &mode) == nil {
		switch mode {
		case "auto", "none", "required":
			q.ToolChoice = &pb.ToolChoice{Mode: mode}
		default:
			return badRequest("tool_choice", "invalid_value", "Invalid value for 'tool_choice': %q (want none, auto, required or an object naming a function).", mode)
		}
	} else {
		var c struct {
			Type     string `json:"type"`
			Function struct {
				Name string `json:"name"`
			} `json:"function"`
		}
		if json.Unmarshal(req.ToolChoice, &c) != nil || c.Type != "function" || c.Function.Name == "" {
			return badRequest("tool_choice", "invalid_value", "Invalid value for 'tool_choice': want a string or {\"type\":\"function\",\"function\":{\"name\":...}}.")
		}
		q.ToolChoice = &pb.ToolChoice{Mode: "function", Name: c.Function.Name}
	}
	if (q.ToolChoice.Mode == "required" || q.ToolChoice.Mode == "function") && len(q.Tools) == 0 {
		return badRequest("tool_choice", "invalid_value", "'tool_choice' %s needs 'tools'.", q.ToolChoice.Mode)
	}
	return nil
}

// compact is raw JSON without insignificant white space.
func compact(raw json.RawMessage) string {
	var buf bytes.Buffer
	if json.Compact(&buf, raw) != nil {
		buf.Reset()
		buf.Write(raw)
	}
	// encoding/json keeps a raw value's bytes as they came; in a string
	// field it would have made bytes that are not UTF-8 U+FFFD, and a
	// protobuf string must be UTF-8, so the same here.
	return strings.ToValidUTF8(buf.String(), "\uFFFD")
}

// responseFormat translates response_format.
func responseFormat(raw json.RawMessage) (*pb.ResponseFormat, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	var f struct {
		Type       string `json:"type"`
		JSONSchema *struct {
			Name   string          `json:"name"`
			Schema json.RawMessage `json:"schema"`
			Strict *bool           `json:"strict"`
		} `json:"json_schema"`
	}
	if err := json.Unmarshal(raw, &f); err != nil {
		return nil, badRequest("response_format", "invalid_type", "Invalid type for 'response_format': expected an object.")
	}
	switch f.Type {
	case "text":
		return nil, nil // no constraint: any worker will do
	case "json_object":
		return &pb.ResponseFormat{Type: "json_object"}, nil
	case "json_schema":
		if f.JSONSchema == nil {
			return nil, badRequest("response_format.json_schema", "missing_required_parameter", "Missing required parameter: 'response_format.json_schema'.")
		}
		if f.JSONSchema.Name == "" {
			// As OpenAI: the name is required (it names the format to
			// the model).
			return nil, badRequest("response_format.json_schema.name", "missing_required_parameter", "Missing required parameter: 'response_format.json_schema.name'.")
		}
		var obj map[string]any
		if json.Unmarshal(f.JSONSchema.Schema, &obj) != nil {
			return nil, badRequest("response_format.json_schema.schema", "invalid_type", "Invalid type for 'response_format.json_schema.schema': expected a JSON Schema object.")
		}
		return &pb.ResponseFormat{Type: "json_schema", Name: f.JSONSchema.Name, Schema: compact(f.JSONSchema.Schema),
			Strict: f.JSONSchema.Strict != nil && *f.JSONSchema.Strict}, nil
	case "":
		return nil, badRequest("response_format.type", "missing_required_parameter", "Missing required parameter: 'response_format.type'.")
	}
	return nil, badRequest("response_format.type", "invalid_value", "Invalid value for 'response_format.type': %q (want text, json_object or json_schema).", f.Type)
}

func translateMessage(i int, m chatMessage, mediaLeft int64) (*pb.Message, int64, *apiError) {
	field := fmt.Sprintf("messages[%d]", i)
	role := m.Role
	switch role {
	case "system", "user", "assistant", "tool":
	case "developer": // OpenAI's newer name for system
		role = "system"
	case "function":
		role = "tool"
	case "":
		return nil, 0, badRequest(field+".role", "missing_required_parameter", "Missing required parameter: '%s.role'.", field)
	default:
		return nil, 0, badRequest(field+".role", "invalid_value", "Invalid value for '%s.role': %q (want system, developer, user, assistant or tool).", field, m.Role)
	}
	pm := &pb.Message{Role: role}
	if len(m.ToolCalls) > 0 && role != "assistant" {
		return nil, 0, badRequest(field+".tool_calls", "invalid_value", "Only assistant messages hold 'tool_calls'.")
	}
	for j, c := range m.ToolCalls {
		if c.Type != "" && c.Type != "function" {
			return nil, 0, badRequest(fmt.Sprintf("%s.tool_calls[%d].type", field, j), "unsupported_value", "Tool call type %q is not supported (want function).", c.Type)
		}
		pm.ToolCalls = append(pm.ToolCalls, &pb.ToolCall{Id: c.ID, Name: c.Function.Name, Arguments: c.Function.Arguments})
	}
	if role == "tool" {
		if m.ToolCallID == "" && m.Role == "tool" {
			return nil, 0, badRequest(field+".tool_call_id", "missing_required_parameter", "Missing required parameter: '%s.tool_call_id'.", field)
		}
		pm.ToolCallId, pm.Name = m.ToolCallID, m.Name
	}
	switch m.Content.kind {
	case contentNull:
		return pm, 0, nil // assistant messages with tool calls have no content
	case contentText:
		pm.Content = m.Content.text
		return pm, 0, nil
	case contentInvalid:
		return nil, 0, badRequest(field+".content", "invalid_type", "Invalid type for '%s.content': expected a string or an array of content parts.", field)
	}
	if m.Content.hasBad {
		pf := fmt.Sprintf("%s.content[%d]", field, m.Content.badPart)
		return nil, 0, badRequest(pf, "invalid_type", "Invalid content part '%s': expected an object with a string 'type'.", pf)
	}
	// The text parts are joined by "\n"; each image keeps its place
	// among them as an offset into the joined text (Attachment.at), so
	// a backend that takes parts (OpenAI's API) gets them in the order
	// sent. An empty text part is left out: it would put a joiner where
	// no text is, and a worker could not tell it from one.
	var texts []string
	var media int64
	joined := 0 // bytes of the text so far, joiners included
	addText := func(s string) {
		if s == "" {
			return
		}
		if len(texts) > 0 {
			joined++
		}
		texts = append(texts, s)
		joined += len(s)
	}
	for j := range m.Content.parts {
		p := &m.Content.parts[j]
		pf := fmt.Sprintf("%s.content[%d]", field, j)
		switch p.Type {
		case "text", "input_text":
			addText(p.Text)
		case "refusal":
			addText(p.Refusal)
		case "image_url", "input_image":
			if len(pm.Attachments) >= protocol.MaxAttachments {
				return nil, 0, badRequest(pf, "invalid_value", "Too many images in '%s': limit %d.", field, protocol.MaxAttachments)
			}
			att, err := imagePart(pf+".image_url", p.ImageURL, mediaLeft-media)
			if err != nil {
				return nil, 0, err
			}
			media += int64(len(att.Data))
			att.At = proto.Uint32(uint32(joined))
			pm.Attachments = append(pm.Attachments, att)
		case "":
			return nil, 0, badRequest(pf+".type", "missing_required_parameter", "Missing required parameter: '%s.type'.", pf)
		default:
			return nil, 0, badRequest(pf+".type", "unsupported_value", "Content part type %q is not supported (want text or image_url).", p.Type)
		}
	}
	pm.Content = strings.Join(texts, "\n")
	return pm, media, nil
}

// imagePart checks an image_url part: {"url": "data:image/png;base64,..."}
// (a bare string is accepted too), of at most left decoded bytes. The
// bridge never fetches remote URLs: it would turn every bridge into an
// open proxy.
func imagePart(field string, u imageURLPart, left int64) (*pb.Attachment, *apiError) {
	if !u.ok {
		return nil, badRequest(field, "invalid_type", "Invalid type for '%s': expected an object with a 'url'.", field)
	}
	d := u.url
	field += ".url"
	if !d.given {
		return nil, badRequest(field, "missing_required_parameter", "Missing required parameter: '%s'.", field)
	}
	tooMuch := tooLarge(field, "Media in '%s' exceeds the remaining media limit of %d bytes.", field, max(left, 0))
	switch {
	case d.problem == dataURLNotData:
		return nil, badRequest(field, "invalid_value", "'%s' must be a data: URL with base64 content (data:image/png;base64,...); the bridge does not fetch remote URLs.", field)
	case d.problem == dataURLNotBase64:
		return nil, badRequest(field, "invalid_value", "'%s' must be a base64 data: URL (data:<mime>;base64,<data>).", field)
	case d.problem == dataURLBadMediaType:
		return nil, badRequest(field, "invalid_value", "'%s' has an invalid media type.", field)
	case d.problem == dataURLTooLarge || d.size > left+3: // base64 length rounds up by 3 at most
		return nil, tooMuch
	case d.problem == dataURLBadBase64:
		return nil, badRequest(field, "invalid_value", "'%s' is not valid base64.", field)
	case int64(len(d.data)) > left:
		return nil, tooMuch
	case len(d.data) == 0:
		return nil, badRequest(field, "invalid_value", "'%s' is empty.", field)
	case !strings.HasPrefix(d.mime, "image/"):
		return nil, badRequest(field, "invalid_value", "'%s' holds %s, not an image.", field, d.mime)
	}
	return &pb.Attachment{Mime: d.mime, Data: d.data}, nil
}

func chatParams(req *chatRequest) (*pb.Params, *apiError) {
	p := &pb.Params{}
	maxTok := req.MaxCompletionTokens
	field := "max_completion_tokens"
	if maxTok == nil {
		maxTok, field = req.MaxTokens, "max_tokens"
	}
	if maxTok != nil {
		if *maxTok < 1 || *maxTok > protocol.MaxMaxTokens {
			return nil, badRequest(field, "invalid_value", "Invalid value for '%s': %d (want 1 to %d).", field, *maxTok, protocol.MaxMaxTokens)
		}
		p.MaxTokens = uint32(*maxTok)
	}
	if t := req.Temperature; t != nil {
		if *t < 0 || *t > 2 || math.IsNaN(*t) {
			return nil, badRequest("temperature", "invalid_value", "Invalid value for 'temperature': %v (want 0 to 2).", *t)
		}
		p.Temperature = proto.Float32(float32(*t))
	}
	if t := req.TopP; t != nil {
		if *t < 0 || *t > 1 || math.IsNaN(*t) {
			return nil, badRequest("top_p", "invalid_value", "Invalid value for 'top_p': %v (want 0 to 1).", *t)
		}
		p.TopP = proto.Float32(float32(*t))
	}
	stops, err := stringOrArray(req.Stop, "stop")
	if err != nil {
		return nil, err
	}
	if len(stops) > protocol.MaxStops {
		return nil, badRequest("stop", "invalid_value", "Too many stop sequences: %d, limit %d.", len(stops), protocol.MaxStops)
	}
	for _, s := range stops {
		if s == "" || len(s) > protocol.MaxStopLen {
			return nil, badRequest("stop", "invalid_value", "Each stop sequence must be 1 to %d bytes.", protocol.MaxStopLen)
		}
	}
	p.Stop = stops
	if req.Seed != nil {
		p.Seed = proto.Int64(*req.Seed)
	}
	for _, pen := range []struct {
		name string
		v    *float64
		dst  **float32
	}{{"presence_penalty", req.PresencePenalty, &p.PresencePenalty}, {"frequency_penalty", req.FrequencyPenalty, &p.FrequencyPenalty}} {
		if pen.v == nil {
			continue
		}
		if *pen.v < -protocol.MaxPenalty || *pen.v > protocol.MaxPenalty || math.IsNaN(*pen.v) {
			return nil, badRequest(pen.name, "invalid_value", "Invalid value for '%s': %v (want -2 to 2).", pen.name, *pen.v)
		}
		*pen.dst = proto.Float32(float32(*pen.v))
	}
	p.Logprobs = req.Logprobs != nil && *req.Logprobs
	if n := req.TopLogprobs; n != nil {
		if *n < 0 || *n > protocol.MaxTopLogprobs {
			return nil, badRequest("top_logprobs", "invalid_value", "Invalid value for 'top_logprobs': %d (want 0 to %d).", *n, protocol.MaxTopLogprobs)
		}
		if *n > 0 && !p.Logprobs {
			return nil, badRequest("top_logprobs", "invalid_value", "'top_logprobs' needs 'logprobs': true.")
		}
		p.TopLogprobs = uint32(*n)
	}
	return p, nil
}

// checkFrame refuses a query whose wire form would exceed the request frame.
func checkFrame(q *pb.QueryRequest) *apiError {
	if n := proto.Size(q); n > protocol.MaxRequestFrame {
		return tooLarge("", "The query is %d bytes on the wire, over the swarm's limit of %d.", n, protocol.MaxRequestFrame)
	}
	return nil
}
