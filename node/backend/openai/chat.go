package openai

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"strings"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/httputil"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

type chatRequest struct {
	Model         string         `json:"model"`
	Messages      []chatMessage  `json:"messages"`
	Stream        bool           `json:"stream"`
	StreamOptions *streamOptions `json:"stream_options,omitempty"`
	MaxTokens     uint32         `json:"max_tokens,omitempty"`
	Temperature   *float32       `json:"temperature,omitempty"`
	TopP          *float32       `json:"top_p,omitempty"`
	Stop          []string       `json:"stop,omitempty"`
	Seed          *int64         `json:"seed,omitempty"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

// chatMessage's content is a string, or content parts when it carries
// images.
type chatMessage struct {
	Role    string `json:"role"`
	Content any    `json:"content"`
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

// chunk is one streamed event of /v1/chat/completions.
type chunk struct {
	Choices []struct {
		Delta struct {
			Content string `json:"content"`
		} `json:"delta"`
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
	finished, gotUsage := false, false
	events := httputil.NewSSE(x, httputil.MaxLine)
	for {
		data, err := events.Next()
		if errors.Is(err, io.EOF) {
			if !finished {
				return backend.Usage{}, httputil.Truncated()
			}
			break
		}
		if err != nil {
			return backend.Usage{}, err
		}
		if strings.TrimSpace(data) == "[DONE]" {
			break
		}
		var c chunk
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			return backend.Usage{}, httputil.Malformed("%v", err)
		}
		if len(c.Error) > 0 && string(c.Error) != "null" {
			return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend error mid-stream: %s", httputil.ErrorMessage(wrapError(c.Error)))
		}
		for _, ch := range c.Choices {
			if ch.Delta.Content != "" {
				chunks++
				if err := httputil.SendText(out, ch.Delta.Content); err != nil {
					return backend.Usage{}, err
				}
			}
			if ch.FinishReason != nil && *ch.FinishReason != "" {
				finished = true
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
	return u, nil
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
		role, text string
		images     []*pb.Attachment
	}
	var ms []msg
	for _, m := range q.GetMessages() {
		ms = append(ms, msg{role: m.GetRole(), text: m.GetContent(), images: m.GetAttachments()})
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
			out = append(out, chatMessage{Role: m.role, Content: m.text})
			continue
		}
		parts := []contentPart{{Type: "text", Text: m.text}}
		for _, a := range m.images {
			if !strings.HasPrefix(a.GetMime(), "image/") {
				return nil, protocol.Errorf(protocol.CodeBadRequest, "chat takes only image attachments, not %s", a.GetMime())
			}
			parts = append(parts, contentPart{Type: "image_url", ImageURL: &imageURL{
				URL: "data:" + a.GetMime() + ";base64," + base64.StdEncoding.EncodeToString(a.GetData()),
			}})
		}
		out = append(out, chatMessage{Role: m.role, Content: parts})
	}
	return out, nil
}
