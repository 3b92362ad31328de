package openai

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"

	jsonv2 "github.com/go-json-experiment/json"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/httputil"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

type chatRequest struct {
	Model            string          `json:"model"`
	Messages         []chatMessage   `json:"messages"`
	Stream           bool            `json:"stream"`
	StreamOptions    *streamOptions  `json:"stream_options,omitempty"`
	MaxTokens        uint32          `json:"max_tokens,omitempty"`
	Temperature      *float32        `json:"temperature,omitempty"`
	TopP             *float32        `json:"top_p,omitempty"`
	Stop             []string        `json:"stop,omitempty"`
	Seed             *int64          `json:"seed,omitempty"`
	PresencePenalty  *float32        `json:"presence_penalty,omitempty"`
	FrequencyPenalty *float32        `json:"frequency_penalty,omitempty"`
	Logprobs         bool            `json:"logprobs,omitempty"`
	TopLogprobs      *uint32         `json:"top_logprobs,omitempty"`
	Tools            []tool          `json:"tools,omitempty"`
	ToolChoice       any             `json:"tool_choice,omitempty"`
	ResponseFormat   *responseFormat `json:"response_format,omitempty"`
	// Continuing a final assistant message: vLLM's names; llama.cpp's
	// server continues a final assistant message by itself.
	ContinueFinal       bool  `json:"continue_final_message,omitempty"`
	AddGenerationPrompt *bool `json:"add_generation_prompt,omitempty"`
}

type tool struct {
	Type     string       `json:"type"`
	Function toolFunction `json:"function"`
}

type toolFunction struct {
	Name        string          `json:"name"`
	Description string          `json:"description,omitempty"`
	Parameters  json.RawMessage `json:"parameters,omitempty"`
	Strict      bool            `json:"strict,omitempty"`
}

type responseFormat struct {
	Type       string      `json:"type"`
	JSONSchema *jsonSchema `json:"json_schema,omitempty"`
}

type jsonSchema struct {
	Name   string          `json:"name"`
	Schema json.RawMessage `json:"schema"`
	Strict bool            `json:"strict,omitempty"`
}

type toolCall struct {
	Index    *uint32 `json:"index,omitempty"`
	ID       string  `json:"id,omitempty"`
	Type     string  `json:"type,omitempty"`
	Function struct {
		Name      string `json:"name,omitempty"`
		Arguments string `json:"arguments"`
	} `json:"function"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

// chatMessage's content is a string, or content parts when it carries
// images.
type chatMessage struct {
	Role       string     `json:"role"`
	Content    any        `json:"content"`
	ToolCalls  []toolCall `json:"tool_calls,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
	Name       string     `json:"name,omitempty"`
}

type contentPart struct {
	Type     string    `json:"type"`
	Text     string    `json:"text,omitempty"`
	ImageURL *imageURL `json:"image_url,omitempty"`
}

type imageURL struct {
	URL string `json:"url"`
}

type usage struct {
	PromptTokens     uint32 `json:"prompt_tokens"`
	CompletionTokens uint32 `json:"completion_tokens"`
}

type logprobEntry struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

// chunk is one streamed event of /v1/chat/completions.
type chunk struct {
	Choices []struct {
		Delta struct {
			Content   string     `json:"content"`
			ToolCalls []toolCall `json:"tool_calls"`
		} `json:"delta"`
		Logprobs *struct {
			Content []struct {
				logprobEntry
				TopLogprobs []logprobEntry `json:"top_logprobs"`
			} `json:"content"`
		} `json:"logprobs"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *usage          `json:"usage"`
	Error json.RawMessage `json:"error"`
}

func (b *Backend) chat(ctx context.Context, q *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	msgs, err := messages(q)
	if err != nil {
		return backend.Usage{}, err
	}
	p := q.GetParams()
	body := chatRequest{
		Model: q.GetModel(), Messages: msgs, Stream: true,
		StreamOptions: &streamOptions{IncludeUsage: true},
		MaxTokens:     p.GetMaxTokens(), Stop: p.GetStop(),
	}
	if p != nil { // a request may carry no params at all
		body.Temperature, body.TopP, body.Seed = p.Temperature, p.TopP, p.Seed
		body.PresencePenalty, body.FrequencyPenalty = p.PresencePenalty, p.FrequencyPenalty
		if p.GetLogprobs() {
			body.Logprobs = true
			if n := p.GetTopLogprobs(); n > 0 {
				body.TopLogprobs = &n
			}
		}
	}
	body.Tools, body.ToolChoice = tools(q)
	body.ResponseFormat = format(q.GetResponseFormat())
	if c := q.GetContinuation(); c != "" {
		// The server continues a final assistant message holding what was
		// said so far and sends only what follows.
		body.Messages = append(body.Messages, chatMessage{Role: "assistant", Content: c})
		no := false
		body.ContinueFinal, body.AddGenerationPrompt = true, &no
	}
	x, err := b.postChat(ctx, body)
	var pe *protocol.Error
	if errors.As(err, &pe) && pe.Code == protocol.CodeBadRequest && strings.Contains(pe.Message, "stream_options") {
		// Some servers refuse stream_options; usage is then counted here.
		body.StreamOptions = nil
		x, err = b.postChat(ctx, body)
	}
	if err != nil {
		return backend.Usage{}, err
	}
	defer x.Close()

	var u backend.Usage
	var chunks uint32
	var reason string
	finished, gotUsage := false, false
	calls := map[uint32]bool{} // tool-call indexes seen
	events := httputil.NewSSE(x, httputil.MaxLine)
	for {
		data, err := events.NextBytes()
		if errors.Is(err, io.EOF) {
			if !finished {
				return backend.Usage{}, httputil.Truncated()
			}
			break
		}
		if err != nil {
			return backend.Usage{}, err
		}
		if string(bytes.TrimSpace(data)) == "[DONE]" {
			x.Finish()
			break
		}
		var c chunk
		if err := jsonv2.Unmarshal(data, &c, b.chunkJSON); err != nil {
			return backend.Usage{}, httputil.Malformed("%v", err)
		}
		if len(c.Error) > 0 && string(c.Error) != "null" {
			return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend error mid-stream: %s", httputil.ErrorMessage(wrapError(c.Error)))
		}
		for _, ch := range c.Choices {
			if ch.Delta.Content != "" {
				chunks++
				var lps []*pb.TokenLogprob
				if ch.Logprobs != nil {
					for _, e := range ch.Logprobs.Content {
						bs, err := tokenBytes(e.Token, e.Bytes)
						if err != nil {
							return backend.Usage{}, err
						}
						lp := &pb.TokenLogprob{Token: e.Token, Logprob: float32(e.Logprob), Bytes: bs}
						for _, t := range e.TopLogprobs {
							tbs, err := tokenBytes(t.Token, t.Bytes)
							if err != nil {
								return backend.Usage{}, err
							}
							lp.Top = append(lp.Top, &pb.TopLogprob{Token: t.Token, Logprob: float32(t.Logprob), Bytes: tbs})
						}
						lps = append(lps, lp)
					}
				}
				var err error
				if len(lps) > 0 && len(ch.Delta.Content) <= protocol.MaxChunkText {
					err = backend.SendLogprobs(out, ch.Delta.Content, lps)
				} else {
					err = httputil.SendText(out, ch.Delta.Content)
				}
				if err != nil {
					return backend.Usage{}, err
				}
			}
			for i, tc := range ch.Delta.ToolCalls {
				idx := uint32(i)
				if tc.Index != nil {
					idx = *tc.Index
				}
				d := &pb.ToolCallDelta{Index: idx, Arguments: tc.Function.Arguments}
				if !calls[idx] {
					calls[idx] = true
					d.Id, d.Name = tc.ID, tc.Function.Name
					if d.Id == "" {
						// Some servers number calls without ids; a tool
						// message must be able to answer this one.
						d.Id = fmt.Sprintf("call_%x_%d", q.GetId(), idx)
					}
				}
				if err := backend.SendToolCall(out, d); err != nil {
					return backend.Usage{}, err
				}
			}
			if ch.FinishReason != nil && *ch.FinishReason != "" {
				finished = true
				reason = FinishReason(*ch.FinishReason)
			}
		}
		if c.Usage != nil {
			gotUsage = true
			u = backend.Usage{PromptTokens: c.Usage.PromptTokens, CompletionTokens: c.Usage.CompletionTokens}
		}
	}
	if !gotUsage {
		// Without a usage report each content delta is about one token.
		u.CompletionTokens = chunks
	}
	u.FinishReason = reason
	return u, nil
}

// FinishReason maps an OpenAI-style finish reason to the protocol's; ""
// for one it does not know (vLLM's "abort", for one).
func FinishReason(r string) string {
	switch r {
	case "stop", "eos", "stop_sequence":
		return protocol.FinishStop
	case "length", "max_tokens":
		return protocol.FinishLength
	case "tool_calls", "function_call":
		return protocol.FinishToolCalls
	case "content_filter":
		return protocol.FinishContentFilter
	}
	return ""
}

// tokenBytes keeps a token's raw bytes only where its text cannot hold
// them (a piece of a UTF-8 sequence). A value that is no byte is a
// malformed answer, not one to cut down to a byte.
func tokenBytes(token string, bs []int) ([]byte, error) {
	for _, b := range bs {
		if b < 0 || b > 255 {
			return nil, httputil.Malformed("logprob byte %d out of range", b)
		}
	}
	if len(bs) == 0 || utf8.ValidString(token) && len(token) == len(bs) {
		return nil, nil
	}
	out := make([]byte, 0, len(bs))
	for _, b := range bs {
		out = append(out, byte(b))
	}
	return out, nil
}

// tools converts the query's tools and tool choice.
func tools(q *pb.QueryRequest) ([]tool, any) {
	var ts []tool
	for _, t := range q.GetTools() {
		f := toolFunction{Name: t.GetName(), Description: t.GetDescription(), Strict: t.GetStrict()}
		if t.GetParameters() != "" {
			f.Parameters = json.RawMessage(t.GetParameters())
		}
		ts = append(ts, tool{Type: "function", Function: f})
	}
	c := q.GetToolChoice()
	switch c.GetMode() {
	case "":
		return ts, nil
	case "function":
		return ts, map[string]any{"type": "function", "function": map[string]string{"name": c.GetName()}}
	}
	return ts, c.GetMode()
}

// format converts a response format.
func format(f *pb.ResponseFormat) *responseFormat {
	switch f.GetType() {
	case "json_object", "text":
		return &responseFormat{Type: f.GetType()}
	case "json_schema":
		name := f.GetName()
		if name == "" {
			name = "response" // OpenAI requires one
		}
		return &responseFormat{Type: "json_schema", JSONSchema: &jsonSchema{Name: name, Schema: json.RawMessage(f.GetSchema()), Strict: f.GetStrict()}}
	}
	return nil
}

// wrapError wraps an "error" member back into an object for ErrorMessage.
func wrapError(errField json.RawMessage) []byte {
	return append(append([]byte(`{"error":`), errField...), '}')
}

func (b *Backend) postChat(ctx context.Context, body chatRequest) (*httputil.Exchange, error) {
	req, err := httputil.NewJSONRequest(b.root+"/v1/chat/completions", body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "text/event-stream")
	return b.send(ctx, req, b.work, b.idle)
}

// messages converts the conversation. Images become image_url content
// parts with data: URLs. A bare prompt becomes a user message, and images
// attached to the request go with the last user message.
func messages(q *pb.QueryRequest) ([]chatMessage, error) {
	type msg struct {
		role, text   string
		images       []*pb.Attachment
		calls        []*pb.ToolCall
		callID, name string
	}
	var ms []msg
	for _, m := range q.GetMessages() {
		ms = append(ms, msg{role: m.GetRole(), text: m.GetContent(), images: m.GetAttachments(),
			calls: m.GetToolCalls(), callID: m.GetToolCallId(), name: m.GetName()})
	}
	if p := q.GetPrompt(); strings.TrimSpace(p) != "" {
		ms = append(ms, msg{role: "user", text: p})
	}
	if len(ms) == 0 {
		return nil, protocol.Errorf(protocol.CodeBadRequest, "no messages and no prompt")
	}
	if atts := q.GetAttachments(); len(atts) > 0 {
		i := len(ms) - 1
		for j := i; j >= 0; j-- {
			if ms[j].role == "user" {
				i = j
				break
			}
		}
		ms[i].images = append(ms[i].images, atts...)
	}
	out := make([]chatMessage, 0, len(ms))
	for _, m := range ms {
		if len(m.images) == 0 {
			cm := chatMessage{Role: m.role, Content: m.text, ToolCallID: m.callID, Name: m.name}
			for _, c := range m.calls {
				tc := toolCall{ID: c.GetId(), Type: "function"}
				tc.Function.Name, tc.Function.Arguments = c.GetName(), c.GetArguments()
				cm.ToolCalls = append(cm.ToolCalls, tc)
			}
			if len(m.calls) > 0 && m.text == "" {
				cm.Content = nil // OpenAI's shape for an assistant message that only calls
			}
			out = append(out, cm)
			continue
		}
		parts, err := contentParts(m.text, m.images)
		if err != nil {
			return nil, err
		}
		out = append(out, chatMessage{Role: m.role, Content: parts})
	}
	return out, nil
}

// contentParts lays out a message's text and images as OpenAI's content
// parts: each image where its Attachment.at puts it in the text (the
// "\n" that joined the text parts around it left out), or, unplaced,
// after the text. A text part is never empty.
func contentParts(text string, images []*pb.Attachment) ([]contentPart, error) {
	parts := make([]contentPart, 0, 2*len(images)+1)
	addText := func(s string) {
		if s != "" {
			parts = append(parts, contentPart{Type: "text", Text: s})
		}
	}
	from := 0 // text not yet laid out begins here
	for _, a := range images {
		if !strings.HasPrefix(a.GetMime(), "image/") {
			return nil, protocol.Errorf(protocol.CodeBadRequest, "chat takes only image attachments, not %s", a.GetMime())
		}
		at := len(text)
		if a.At != nil {
			at = min(int(a.GetAt()), len(text)) // validated; kept in range all the same
		}
		if at >= from { // not the place of the image before, whose joiner is passed
			addText(text[from:at])
			from = at
			if 0 < at && at < len(text) && text[at] == '\n' {
				from++ // the joiner between the text before and after
			}
		}
		parts = append(parts, contentPart{Type: "image_url", ImageURL: &imageURL{
			URL: "data:" + a.GetMime() + ";base64," + base64.StdEncoding.EncodeToString(a.GetData()),
		}})
	}
	addText(text[from:])
	return parts, nil
}
