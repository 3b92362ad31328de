package openai

import (
	"bytes"
	"context"
	"encoding/base64"
	"mime"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"strings"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/httputil"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

func (b *Backend) embed(ctx context.Context, q *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	inputs := q.GetInputs()
	if len(inputs) == 0 {
		p := promptText(q)
		if p == "" {
			return backend.Usage{}, protocol.Errorf(protocol.CodeBadRequest, "embed needs inputs or a prompt")
		}
		inputs = []string{p}
	}
	req, err := httputil.NewJSONRequest(b.root+"/v1/embeddings", map[string]any{
		"model": q.GetModel(), "input": inputs, "encoding_format": "float",
	})
	if err != nil {
		return backend.Usage{}, err
	}
	x, err := b.send(ctx, req, b.work, 0)
	if err != nil {
		return backend.Usage{}, err
	}
	defer x.Close()
	var r struct {
		Data []struct {
			Index     int       `json:"index"`
			Embedding []float32 `json:"embedding"`
		} `json:"data"`
		Usage usage `json:"usage"`
	}
	if err := x.ReadJSON(maxEmbedBody, &r); err != nil {
		return backend.Usage{}, err
	}
	if len(r.Data) != len(inputs) {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend returned %d embeddings for %d inputs", len(r.Data), len(inputs))
	}
	seen := make([]bool, len(inputs))
	for _, d := range r.Data {
		if d.Index < 0 || d.Index >= len(inputs) || seen[d.Index] {
			return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend returned embedding index %d for %d inputs", d.Index, len(inputs))
		}
		seen[d.Index] = true
		if len(d.Embedding) == 0 || len(d.Embedding) > protocol.MaxEmbeddingDim {
			return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend returned an embedding of dimension %d", len(d.Embedding))
		}
	}
	for _, d := range r.Data {
		if err := out.Embedding(d.Index, d.Embedding); err != nil {
			return backend.Usage{}, err
		}
	}
	return backend.Usage{PromptTokens: r.Usage.PromptTokens}, nil
}

func (b *Backend) imagine(ctx context.Context, q *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	prompt := promptText(q)
	if prompt == "" {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBadRequest, "imagine needs a prompt")
	}
	body := map[string]any{"model": q.GetModel(), "prompt": prompt, "n": 1, "response_format": "b64_json"}
	if s := q.GetParams().GetSize(); s != "" {
		body["size"] = s
	}
	x, err := b.postMedia(ctx, "/v1/images/generations", body)
	if pe := protocol.AsError(err); pe != nil && pe.Code == protocol.CodeBadRequest && strings.Contains(pe.Message, "response_format") {
		// Models that always answer in base64 (gpt-image) refuse the field.
		delete(body, "response_format")
		x, err = b.postMedia(ctx, "/v1/images/generations", body)
	}
	if err != nil {
		return backend.Usage{}, err
	}
	defer x.Close()
	var r struct {
		Data []struct {
			B64JSON string `json:"b64_json"`
			URL     string `json:"url"`
		} `json:"data"`
	}
	if err := x.ReadJSON(maxImageBody, &r); err != nil {
		return backend.Usage{}, err
	}
	if len(r.Data) == 0 {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend returned no image")
	}
	if r.Data[0].B64JSON == "" {
		// Fetching a URL the backend names would let it steer the worker's
		// requests anywhere; only inline images are accepted.
		return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend returned an image URL, not b64_json")
	}
	img, err := base64.StdEncoding.DecodeString(r.Data[0].B64JSON)
	if err != nil {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend returned bad base64: %v", err)
	}
	if len(img) > httputil.MaxMedia {
		return backend.Usage{}, protocol.Errorf(protocol.CodeTooLarge, "image of %d bytes exceeds %d", len(img), httputil.MaxMedia)
	}
	mt := http.DetectContentType(img)
	if !strings.HasPrefix(mt, "image/") {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend returned %s, not an image", mt)
	}
	return backend.Usage{}, out.Media(mt, img)
}

func (b *Backend) postMedia(ctx context.Context, path string, body any) (*httputil.Exchange, error) {
	req, err := httputil.NewJSONRequest(b.root+path, body)
	if err != nil {
		return nil, err
	}
	return b.send(ctx, req, b.work, 0)
}

// audioExt names an upload after its mime type; servers pick the decoder
// by file name.
var audioExt = map[string]string{
	"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/mpeg": "mp3", "audio/mp3": "mp3",
	"audio/mp4": "m4a", "audio/m4a": "m4a", "audio/x-m4a": "m4a", "audio/ogg": "ogg", "audio/webm": "webm",
	"audio/flac": "flac", "audio/x-flac": "flac", "video/webm": "webm",
}

func (b *Backend) transcribe(ctx context.Context, q *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	audio := findAudio(q)
	if audio == nil {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBadRequest, "stt needs an audio attachment")
	}
	base, _, _ := mime.ParseMediaType(audio.GetMime())
	ext, ok := audioExt[base]
	if !ok {
		ext = "bin"
	}
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	_ = mw.WriteField("model", q.GetModel())
	_ = mw.WriteField("response_format", "json")
	if p := strings.TrimSpace(q.GetPrompt()); p != "" {
		_ = mw.WriteField("prompt", p)
	}
	h := textproto.MIMEHeader{}
	h.Set("Content-Disposition", `form-data; name="file"; filename="audio.`+ext+`"`)
	h.Set("Content-Type", audio.GetMime())
	fw, err := mw.CreatePart(h)
	if err != nil {
		return backend.Usage{}, protocol.Errorf(protocol.CodeInternal, "build upload: %v", err)
	}
	_, _ = fw.Write(audio.GetData())
	if err := mw.Close(); err != nil {
		return backend.Usage{}, protocol.Errorf(protocol.CodeInternal, "build upload: %v", err)
	}
	req, err := http.NewRequest(http.MethodPost, b.root+"/v1/audio/transcriptions", &buf)
	if err != nil {
		return backend.Usage{}, protocol.Errorf(protocol.CodeInternal, "build backend request: %v", err)
	}
	req.Header.Set("Content-Type", mw.FormDataContentType())
	x, err := b.send(ctx, req, b.work, 0)
	if err != nil {
		return backend.Usage{}, err
	}
	defer x.Close()
	var r struct {
		Text string `json:"text"`
	}
	if err := x.ReadJSON(maxListBody, &r); err != nil {
		return backend.Usage{}, err
	}
	return backend.Usage{}, httputil.SendText(out, r.Text)
}

// findAudio is the first audio attachment of the request or its messages.
func findAudio(q *pb.QueryRequest) *pb.Attachment {
	atts := q.GetAttachments()
	for _, m := range q.GetMessages() {
		atts = append(atts[:len(atts):len(atts)], m.GetAttachments()...)
	}
	for _, a := range atts {
		if strings.HasPrefix(a.GetMime(), "audio/") || a.GetMime() == "video/webm" {
			return a
		}
	}
	return nil
}

// speechMime is the media type of each response_format of /v1/audio/speech.
var speechMime = map[string]string{
	"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/L16",
}

func (b *Backend) speak(ctx context.Context, q *pb.QueryRequest, out backend.Sink) (backend.Usage, error) {
	text := promptText(q)
	if text == "" {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBadRequest, "tts needs text")
	}
	format := strings.ToLower(q.GetParams().GetFormat())
	if format == "" {
		format = "mp3"
	}
	if _, ok := speechMime[format]; !ok {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBadRequest, "tts format %q: want mp3, opus, aac, flac, wav or pcm", format)
	}
	voice := q.GetParams().GetVoice()
	if voice == "" {
		voice = "alloy"
	}
	x, err := b.postMedia(ctx, "/v1/audio/speech", map[string]any{
		"model": q.GetModel(), "input": text, "voice": voice, "response_format": format,
	})
	if err != nil {
		return backend.Usage{}, err
	}
	defer x.Close()
	data, err := httputil.ReadAll(x, httputil.MaxMedia)
	if err != nil {
		return backend.Usage{}, err
	}
	if len(data) == 0 {
		return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend returned no audio")
	}
	mt := speechMime[format]
	ct, _, _ := mime.ParseMediaType(x.Resp.Header.Get("Content-Type"))
	switch {
	case strings.HasPrefix(ct, "audio/"):
		mt = ct
	case ct == "application/json" || strings.HasPrefix(ct, "text/"):
		return backend.Usage{}, protocol.Errorf(protocol.CodeBackendError, "backend returned %s instead of audio: %s", ct, httputil.ErrorMessage(data))
	}
	return backend.Usage{}, out.Media(mt, data)
}
