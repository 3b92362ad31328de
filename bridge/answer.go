package bridge

import (
	"fmt"
	"slices"
	"strings"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// answer gathers a non-streamed chat answer: text, tool calls merged from
// their deltas, logprobs; bounded by max bytes in all (the bridge's
// WithMaxAnswer).
type answer struct {
	max      int
	text     strings.Builder
	calls    []*chatToolCall
	logprobs []*pb.TokenLogprob
	size     int
}

func (a *answer) reset() { *a = answer{max: a.max} }

// add takes one event; false means the answer outgrew its bound.
func (a *answer) add(ev *pb.Event, wantLogprobs bool) bool {
	switch k := ev.GetKind().(type) {
	case *pb.Event_Chunk:
		a.size += len(k.Chunk.GetText())
		if wantLogprobs {
			for _, lp := range k.Chunk.GetLogprobs() {
				a.size += logprobJSONSize(lp.GetToken(), lp.GetBytes())
				for _, t := range lp.GetTop() {
					a.size += logprobJSONSize(t.GetToken(), t.GetBytes())
				}
			}
		}
		if a.size > a.max {
			return false
		}
		a.text.WriteString(k.Chunk.GetText())
		if wantLogprobs {
			a.logprobs = append(a.logprobs, k.Chunk.GetLogprobs()...)
		}
	case *pb.Event_ToolCall:
		d := k.ToolCall
		a.size += len(d.GetArguments()) + len(d.GetId()) + len(d.GetName())
		if a.size > a.max {
			return false
		}
		for int(d.GetIndex()) >= len(a.calls) {
			c := &chatToolCall{Type: "function"}
			a.calls = append(a.calls, c)
		}
		c := a.calls[d.GetIndex()]
		if d.GetId() != "" {
			c.ID = d.GetId()
		}
		if d.GetName() != "" {
			c.Function.Name = d.GetName()
		}
		c.Function.Arguments += d.GetArguments()
	}
	return true
}

// logprobJSONSize bounds the JSON of one logprob entry: its token, every
// byte of which may be escaped (\u00XX), its bytes as numbers, and the
// field names and figure. A worker's valid entries are small on the wire
// (a token of 256 bytes, 20 alternatives) but not in JSON: counted by
// their JSON, they cannot take a non-streamed answer past its bound.
func logprobJSONSize(token string, bytes []byte) int {
	return 64 + 6*len(token) + 4*len(bytes)
}

// message is the assistant message of the answer in OpenAI's shape:
// content null when the model only called tools.
func (a *answer) message() chatMessageOut {
	m := chatMessageOut{Role: "assistant", Content: a.text.String()}
	for i, c := range a.calls {
		if c.Function.Name == "" && c.Function.Arguments == "" {
			continue // an index the worker skipped: no call
		}
		if c.ID == "" {
			c.ID = fmt.Sprintf("call_%d", i)
		}
		m.ToolCalls = append(m.ToolCalls, *c)
	}
	return m
}

// logprobsOut is the choice's logprobs object when the query asked for
// them, else nil (JSON null).
func (a *answer) logprobsOut(q *pb.QueryRequest) any {
	if !q.GetParams().GetLogprobs() {
		return nil
	}
	return logprobsJSON(a.logprobs)
}

type topLogprob struct {
	Token   string  `json:"token"`
	Logprob float32 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

type choiceLogprobs struct {
	Content []logprobEntryOut `json:"content"`
	Refusal *string           `json:"refusal"`
}

// logprobEntryOut is OpenAI's logprob of one token.
type logprobEntryOut struct {
	Token       string       `json:"token"`
	Logprob     float32      `json:"logprob"`
	Bytes       []int        `json:"bytes"`
	TopLogprobs []topLogprob `json:"top_logprobs"`
}

func tokenBytes(token string, raw []byte) []int {
	b := raw
	if b == nil {
		b = []byte(token)
	}
	out := make([]int, len(b))
	for i, x := range b {
		out[i] = int(x)
	}
	return out
}

// logprobsJSON converts logprobs to OpenAI's choice.logprobs object.
func logprobsJSON(lps []*pb.TokenLogprob) *choiceLogprobs {
	out := &choiceLogprobs{Content: make([]logprobEntryOut, 0, len(lps))}
	for _, lp := range lps {
		e := logprobEntryOut{Token: lp.GetToken(), Logprob: lp.GetLogprob(), Bytes: tokenBytes(lp.GetToken(), lp.GetBytes()), TopLogprobs: []topLogprob{}}
		for _, t := range lp.GetTop() {
			e.TopLogprobs = append(e.TopLogprobs, topLogprob{Token: t.GetToken(), Logprob: t.GetLogprob(), Bytes: tokenBytes(t.GetToken(), t.GetBytes())})
		}
		out.Content = append(out.Content, e)
	}
	return out
}

// callIndex turns the tool-call deltas of a stream into OpenAI's delta
// shape: the first of each call carries id, type and name.
type callIndex struct{ seen map[uint32]bool }

func (c *callIndex) delta(d *pb.ToolCallDelta) chatToolCall {
	if c.seen == nil {
		c.seen = map[uint32]bool{}
	}
	i := int(d.GetIndex())
	out := chatToolCall{Index: &i}
	out.Function.Arguments = d.GetArguments()
	if !c.seen[d.GetIndex()] {
		c.seen[d.GetIndex()] = true
		out.ID, out.Type, out.Function.Name = d.GetId(), "function", d.GetName()
		if out.ID == "" {
			out.ID = fmt.Sprintf("call_%d", i)
		}
	}
	return out
}

// checkFeatures answers 400 for a query needing a feature (tools, JSON
// output, logprobs) that no peer serving its model announces: the swarm
// would refuse it anyway, and OpenAI's clients expect a 400 naming the
// parameter.
func (s *Server) checkFeatures(q *pb.QueryRequest) *apiError {
	need := protocol.RequiredFeatures(q)
	if len(need) == 0 {
		return nil
	}
	var have []string
	for _, m := range s.swarm.Models() {
		if m.Name == q.GetModel() {
			have = m.Features
		}
	}
	params := map[string]string{
		protocol.FeatureTools:      "tools",
		protocol.FeatureJSONObject: "response_format",
		protocol.FeatureJSONSchema: "response_format",
		protocol.FeatureLogprobs:   "logprobs",
	}
	for _, f := range need {
		if !slices.Contains(have, f) {
			return badRequest(params[f], "unsupported_parameter",
				"The model %q is not served with %s support by any peer of this swarm.", q.GetModel(), f)
		}
	}
	return nil
}
