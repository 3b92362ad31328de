package bridge

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

func dataURL(mime string, n int) string {
	return "data:" + mime + ";base64," + base64.StdEncoding.EncodeToString(make([]byte, n))
}

func TestChatToQuery(t *testing.T) {
	lim := limits{maxMedia: 1000}
	tests := []struct {
		name   string
		body   string
		status int    // 0: ok
		param  string // expected error param
		check  func(t *testing.T, q *pb.QueryRequest)
	}{
		{name: "string content", body: `{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}`,
			check: func(t *testing.T, q *pb.QueryRequest) {
				if q.Type != pb.QueryType_QUERY_TYPE_CHAT || len(q.Messages) != 2 || q.Messages[1].Content != "hi" || q.Messages[0].Role != "system" {
					t.Errorf("got %v", q)
				}
				if len(q.Id) != 16 {
					t.Errorf("id is %d bytes", len(q.Id))
				}
			}},
		{name: "developer role is system", body: `{"model":"m","messages":[{"role":"developer","content":"x"},{"role":"user","content":"y"}]}`,
			check: func(t *testing.T, q *pb.QueryRequest) {
				if q.Messages[0].Role != "system" {
					t.Errorf("role %q", q.Messages[0].Role)
				}
			}},
		{name: "text parts joined", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}`,
			check: func(t *testing.T, q *pb.QueryRequest) {
				if q.Messages[0].Content != "a\nb" || q.Type != pb.QueryType_QUERY_TYPE_CHAT {
					t.Errorf("got %q type %v", q.Messages[0].Content, q.Type)
				}
			}},
		{name: "images keep their place among the text", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":"` + dataURL("image/png", 1) +
			`"},{"type":"text","text":"ab"},{"type":"text","text":""},{"type":"image_url","image_url":"` + dataURL("image/png", 2) +
			`"},{"type":"image_url","image_url":"` + dataURL("image/png", 3) + `"},{"type":"text","text":"cd"},{"type":"image_url","image_url":"` + dataURL("image/png", 4) + `"}]}]}`,
			check: func(t *testing.T, q *pb.QueryRequest) {
				m := q.Messages[0]
				var at []uint32
				for _, a := range m.Attachments {
					if a.At == nil {
						t.Fatalf("attachment of %d bytes has no place", len(a.Data))
					}
					at = append(at, a.GetAt())
				}
				// The empty text part adds no joiner.
				if m.Content != "ab\ncd" || fmt.Sprint(at) != "[0 2 2 5]" {
					t.Errorf("content %q, places %v; want \"ab\\ncd\" and [0 2 2 5]", m.Content, at)
				}
			}},
		{name: "image part makes vision", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"what"},{"type":"image_url","image_url":{"url":"` + dataURL("image/png", 10) + `","detail":"low"}}]}]}`,
			check: func(t *testing.T, q *pb.QueryRequest) {
				a := q.Messages[0].Attachments
				if q.Type != pb.QueryType_QUERY_TYPE_VISION || len(a) != 1 || a[0].Mime != "image/png" || len(a[0].Data) != 10 {
					t.Errorf("got type %v attachments %v", q.Type, a)
				}
			}},
		{name: "escaped slashes in a data: URL", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image\/png;base64,\/\/\/\/"}}]}]}`,
			check: func(t *testing.T, q *pb.QueryRequest) {
				a := q.Messages[0].Attachments
				if len(a) != 1 || a[0].Mime != "image/png" || string(a[0].Data) != "\xff\xff\xff" {
					t.Errorf("attachments %v", a)
				}
			}},
		{name: "bare string image_url, unpadded", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":"data:image/png;base64,AAAAAA"}]}]}`,
			check: func(t *testing.T, q *pb.QueryRequest) {
				if a := q.Messages[0].Attachments; len(a) != 1 || len(a[0].Data) != 4 {
					t.Errorf("attachments %v", a)
				}
			}},
		{name: "assistant null content", body: `{"model":"m","messages":[{"role":"assistant","content":null},{"role":"user","content":"x"}]}`},
		{name: "params", body: `{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":5,"max_completion_tokens":7,"temperature":0.5,"top_p":0.9,"stop":"END","seed":42}`,
			check: func(t *testing.T, q *pb.QueryRequest) {
				p := q.Params
				if p.MaxTokens != 7 || p.GetTemperature() != 0.5 || p.GetTopP() != float32(0.9) || len(p.Stop) != 1 || p.Stop[0] != "END" || p.GetSeed() != 42 {
					t.Errorf("params %v", p)
				}
			}},
		{name: "stop array", body: `{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b"]}`,
			check: func(t *testing.T, q *pb.QueryRequest) {
				if len(q.Params.Stop) != 2 {
					t.Errorf("stop %v", q.Params.Stop)
				}
			}},
		{name: "missing model", body: `{"messages":[{"role":"user","content":"x"}]}`, status: 400, param: "model"},
		{name: "no messages", body: `{"model":"m","messages":[]}`, status: 400, param: "messages"},
		{name: "bad role", body: `{"model":"m","messages":[{"role":"king","content":"x"}]}`, status: 400, param: "messages[0].role"},
		{name: "content number", body: `{"model":"m","messages":[{"role":"user","content":"x"},{"role":"user","content":5}]}`, status: 400, param: "messages[1].content"},
		{name: "part without type", body: `{"model":"m","messages":[{"role":"user","content":[{"text":"x"}]}]}`, status: 400, param: "messages[0].content[0].type"},
		{name: "part of unknown type", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"video","text":"x"}]}]}`, status: 400, param: "messages[0].content[0].type"},
		{name: "remote image url", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"http://example.com/a.png"}}]}]}`, status: 400, param: "messages[0].content[0].image_url.url"},
		{name: "not an image", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"` + dataURL("text/plain", 4) + `"}}]}]}`, status: 400, param: "messages[0].content[0].image_url.url"},
		{name: "bad base64", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,!!!!"}}]}]}`, status: 400, param: "messages[0].content[0].image_url.url"},
		{name: "image over media limit", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"` + dataURL("image/png", 1001) + `"}}]}]}`, status: 413, param: "messages[0].content[0].image_url.url"},
		{name: "images over media limit together", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"` + dataURL("image/png", 600) + `"}}]},{"role":"user","content":[{"type":"image_url","image_url":{"url":"` + dataURL("image/png", 600) + `"}}]}]}`, status: 413},
		{name: "image_url without url", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}`, status: 400, param: "messages[0].content[0].image_url.url"},
		{name: "image_url of wrong type", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":5}]}]}`, status: 400, param: "messages[0].content[0].image_url"},
		{name: "image_url missing", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}`, status: 400, param: "messages[0].content[0].image_url"},
		{name: "part not an object", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},7]}]}`, status: 400, param: "messages[0].content[1]"},
		{name: "image over any query's size", body: `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"` + dataURL("image/png", 9<<20) + `"}}]}]}`, status: 413, param: "messages[0].content[0].image_url.url"},
		{name: "n=2", body: `{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}`, status: 400, param: "n"},
		{name: "temperature too high", body: `{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}`, status: 400, param: "temperature"},
		{name: "max_tokens zero", body: `{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}`, status: 400, param: "max_tokens"},
		{name: "stop of wrong type", body: `{"model":"m","messages":[{"role":"user","content":"x"}],"stop":7}`, status: 400, param: "stop"},
		{name: "too many stops", body: `{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["1","2","3","4","5","6","7","8","9"]}`, status: 400, param: "stop"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var req chatRequest
			if err := json.Unmarshal([]byte(tc.body), &req); err != nil {
				t.Fatalf("test body: %v", err)
			}
			q, aerr := chatToQuery(&req, lim)
			if tc.status == 0 {
				if aerr != nil {
					t.Fatalf("unexpected error %v", aerr)
				}
				if tc.check != nil {
					tc.check(t, q)
				}
				return
			}
			if aerr == nil {
				t.Fatalf("want %d, got query %v", tc.status, q)
			}
			if aerr.Status != tc.status || (tc.param != "" && aerr.Param != tc.param) {
				t.Errorf("got %d param %q (%s), want %d param %q", aerr.Status, aerr.Param, aerr.Message, tc.status, tc.param)
			}
		})
	}
}

func TestOtherTranslations(t *testing.T) {
	t.Run("embed inputs", func(t *testing.T) {
		for body, want := range map[string]int{`"a"`: 1, `["a","b","c"]`: 3} {
			q, err := embedToQuery(&embeddingsRequest{Model: "m", Input: json.RawMessage(body)})
			if err != nil || len(q.Inputs) != want || q.Type != pb.QueryType_QUERY_TYPE_EMBED {
				t.Errorf("%s: %v %v", body, q, err)
			}
		}
	})
	bad := []struct {
		name  string
		req   embeddingsRequest
		param string
	}{
		{"token arrays", embeddingsRequest{Model: "m", Input: json.RawMessage(`[[1,2]]`)}, "input"},
		{"empty input", embeddingsRequest{Model: "m", Input: json.RawMessage(`[""]`)}, "input[0]"},
		{"no input", embeddingsRequest{Model: "m"}, "input"},
		{"no model", embeddingsRequest{Input: json.RawMessage(`"a"`)}, "model"},
		{"bad format", embeddingsRequest{Model: "m", Input: json.RawMessage(`"a"`), EncodingFormat: "hex"}, "encoding_format"},
	}
	for _, tc := range bad {
		t.Run("embed "+tc.name, func(t *testing.T) {
			if _, err := embedToQuery(&tc.req); err == nil || err.Status != http.StatusBadRequest || err.Param != tc.param {
				t.Errorf("got %v, want 400 on %s", err, tc.param)
			}
		})
	}
	t.Run("images", func(t *testing.T) {
		q, err := imagesToQuery(&imagesRequest{Prompt: "a cat", Size: "256x256"})
		if err != nil || q.Type != pb.QueryType_QUERY_TYPE_IMAGINE || q.Params.Size != "256x256" || q.Prompt != "a cat" {
			t.Errorf("%v %v", q, err)
		}
		two := int64(2)
		if _, err := imagesToQuery(&imagesRequest{Prompt: "x", N: &two}); err == nil || err.Param != "n" {
			t.Errorf("n=2: %v", err)
		}
		if _, err := imagesToQuery(&imagesRequest{}); err == nil || err.Param != "prompt" {
			t.Errorf("no prompt: %v", err)
		}
	})
	t.Run("speech", func(t *testing.T) {
		q, err := speechToQuery(&speechRequest{Model: "m", Input: "hello", Voice: "alloy", ResponseFormat: "wav"})
		if err != nil || q.Type != pb.QueryType_QUERY_TYPE_TTS || q.Params.Voice != "alloy" || q.Params.Format != "wav" {
			t.Errorf("%v %v", q, err)
		}
		if _, err := speechToQuery(&speechRequest{Model: "m", Input: strings.Repeat("x", maxSpeechInput+1)}); err == nil || err.Param != "input" {
			t.Errorf("long input: %v", err)
		}
		fast := 9.0
		if _, err := speechToQuery(&speechRequest{Model: "m", Input: "x", Speed: &fast}); err == nil || err.Param != "speed" {
			t.Errorf("speed: %v", err)
		}
	})
}
