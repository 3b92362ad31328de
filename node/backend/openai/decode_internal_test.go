package openai

import (
	"encoding/json"
	"reflect"
	"testing"

	jsonv2 "github.com/go-json-experiment/json"
	jsonv1 "github.com/go-json-experiment/json/v1"
)

var benchChunk = []byte(`{"id":"chatcmpl-b","object":"chat.completion.chunk","created":1764550000,"model":"bench","system_fingerprint":"fp_x","choices":[{"index":0,"delta":{"content":"zq "},"logprobs":null,"finish_reason":null}]}`)

// TestChunkDecodingMatchesEncodingJSON: the chunk decoder keeps
// encoding/json's leniency, which servers in the wild rely on.
func TestChunkDecodingMatchesEncodingJSON(t *testing.T) {
	for _, tc := range []struct{ name, in string }{
		{"plain token", string(benchChunk)},
		{"invalid UTF-8 replaced", "{\"choices\":[{\"delta\":{\"content\":\"a\xffb\"}}]}"},
		{"names in another case", `{"Choices":[{"Delta":{"Content":"x"},"Finish_Reason":"stop"}]}`},
		{"duplicate names", `{"choices":[{"delta":{"content":"a","content":"b"}}]}`},
		{"error object", `{"error":{"message":"boom"}}`},
		{"usage", `{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}`},
		{"tool call and logprobs", `{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"f","arguments":"{}"}}]},"logprobs":{"content":[{"token":"a","logprob":-0.5,"bytes":[97],"top_logprobs":[]}]}}]}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var want, got chunk
			werr := json.Unmarshal([]byte(tc.in), &want)
			gerr := jsonv2.Unmarshal([]byte(tc.in), &got, jsonv1.DefaultOptionsV1())
			if (werr == nil) != (gerr == nil) {
				t.Fatalf("errors differ: encoding/json %v, chunk decoder %v", werr, gerr)
			}
			if !reflect.DeepEqual(want, got) {
				t.Fatalf("decoded differently:\nencoding/json %+v\nchunk decoder %+v", want, got)
			}
		})
	}
}

// BenchmarkDecodeChunk: one streamed token's chunk, by encoding/json and
// by the backend's decoder.
func BenchmarkDecodeChunk(b *testing.B) {
	for _, tc := range []struct {
		name   string
		decode func([]byte, *chunk) error
	}{
		{"encoding-json", func(d []byte, c *chunk) error { return json.Unmarshal(d, c) }},
		{"backend", func(d []byte, c *chunk) error { return jsonv2.Unmarshal(d, c, jsonv1.DefaultOptionsV1()) }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				var c chunk
				if err := tc.decode(benchChunk, &c); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
