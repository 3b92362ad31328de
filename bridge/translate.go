package bridge

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
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
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type chatMessage struct {
	Role    string         `json:"role"`
	Content messageContent `json:"content"`
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
// is decoded rather than kept as raw JSON to decode later: an image in a
// data: URL is then held once as text (until decoded), not once more per
// step of raw JSON in between.
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

// imageURLPart is an image_url value, {"url": "..."} or a bare string,
// decoded at once for the same reason as messageContent.
type imageURLPart struct {
	url string
	ok  bool // present and of a valid shape
}

func (u *imageURLPart) UnmarshalJSON(b []byte) error {
	var o struct {
		URL string `json:"url"`
	}
	if err := json.Unmarshal(b, &o); err == nil {
		*u = imageURLPart{url: o.URL, ok: true}
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		*u = imageURLPart{url: s, ok: true}
		return nil
	}
	*u = imageURLPart{}
	return nil
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
	return q, nil
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
	var texts []string
	var media int64
	for j := range m.Content.parts {
		p := &m.Content.parts[j]
		pf := fmt.Sprintf("%s.content[%d]", field, j)
		switch p.Type {
		case "text", "input_text":
			texts = append(texts, p.Text)
		case "refusal":
			texts = append(texts, p.Refusal)
		case "image_url", "input_image":
			if len(pm.Attachments) >= protocol.MaxAttachments {
				return nil, 0, badRequest(pf, "invalid_value", "Too many images in '%s': limit %d.", field, protocol.MaxAttachments)
			}
			att, err := imagePart(pf+".image_url", p.ImageURL, mediaLeft-media)
			if err != nil {
				return nil, 0, err
			}
			p.ImageURL.url = "" // decoded: let the text go now, not with the request
			media += int64(len(att.Data))
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

// imagePart decodes an image_url part: {"url": "data:image/png;base64,..."}
// (a bare string is accepted too). The bridge never fetches remote URLs: it
// would turn every bridge into an open proxy.
func imagePart(field string, u imageURLPart, left int64) (*pb.Attachment, *apiError) {
	if !u.ok {
		return nil, badRequest(field, "invalid_type", "Invalid type for '%s': expected an object with a 'url'.", field)
	}
	if u.url == "" {
		return nil, badRequest(field+".url", "missing_required_parameter", "Missing required parameter: '%s.url'.", field)
	}
	mt, data, err := decodeDataURL(field+".url", u.url, left)
	if err != nil {
		return nil, err
	}
	if !strings.HasPrefix(mt, "image/") {
		return nil, badRequest(field+".url", "invalid_value", "'%s.url' holds %s, not an image.", field, mt)
	}
	return &pb.Attachment{Mime: mt, Data: data}, nil
}

// decodeDataURL decodes "data:<mime>;base64,<data>", refusing more than
// left decoded bytes before decoding anything.
func decodeDataURL(field, u string, left int64) (string, []byte, *apiError) {
	rest, ok := strings.CutPrefix(u, "data:")
	if !ok {
		return "", nil, badRequest(field, "invalid_value", "'%s' must be a data: URL with base64 content (data:image/png;base64,...); the bridge does not fetch remote URLs.", field)
	}
	meta, payload, ok := strings.Cut(rest, ",")
	if !ok || !strings.HasSuffix(meta, ";base64") {
		return "", nil, badRequest(field, "invalid_value", "'%s' must be a base64 data: URL (data:<mime>;base64,<data>).", field)
	}
	mt, _, err := mime.ParseMediaType(strings.TrimSuffix(meta, ";base64"))
	if err != nil {
		return "", nil, badRequest(field, "invalid_value", "'%s' has an invalid media type.", field)
	}
	if int64(base64.StdEncoding.DecodedLen(len(payload))) > left+3 {
		return "", nil, tooLarge(field, "Media in '%s' exceeds the remaining media limit of %d bytes.", field, max(left, 0))
	}
	data, derr := decodeBase64(payload)
	if derr != nil {
		return "", nil, badRequest(field, "invalid_value", "'%s' is not valid base64.", field)
	}
	if int64(len(data)) > left {
		return "", nil, tooLarge(field, "Media in '%s' exceeds the remaining media limit of %d bytes.", field, max(left, 0))
	}
	if len(data) == 0 {
		return "", nil, badRequest(field, "invalid_value", "'%s' is empty.", field)
	}
	return mt, data, nil
}

// decodeBase64 accepts padded and unpadded standard base64.
func decodeBase64(s string) ([]byte, error) {
	if strings.HasSuffix(s, "=") || len(s)%4 == 0 {
		return base64.StdEncoding.DecodeString(s)
	}
	return base64.RawStdEncoding.DecodeString(s)
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
	return p, nil
}

// checkFrame refuses a query whose wire form would exceed the request frame.
func checkFrame(q *pb.QueryRequest) *apiError {
	if n := proto.Size(q); n > protocol.MaxRequestFrame {
		return tooLarge("", "The query is %d bytes on the wire, over the swarm's limit of %d.", n, protocol.MaxRequestFrame)
	}
	return nil
}
