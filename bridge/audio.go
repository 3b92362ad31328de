package bridge

import (
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"path"
	"strconv"
	"strings"

	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// maxFormField bounds a multipart text field.
const maxFormField = 64 << 10

// maxSpeechInput is OpenAI's limit on text to speak.
const maxSpeechInput = 4096

type transcriptionForm struct {
	model, prompt, language, responseFormat string
	stream                                  bool
	temperature                             *float32
	mime                                    string
	audio                                   []byte
}

// audioMimeByExt maps the file extensions OpenAI accepts to media types,
// since clients often send application/octet-stream.
var audioMimeByExt = map[string]string{
	".flac": "audio/flac", ".m4a": "audio/mp4", ".mp3": "audio/mpeg", ".mp4": "audio/mp4",
	".mpeg": "audio/mpeg", ".mpga": "audio/mpeg", ".oga": "audio/ogg", ".ogg": "audio/ogg",
	".wav": "audio/wav", ".webm": "audio/webm", ".opus": "audio/ogg",
}

// audioMime picks the media type of an uploaded file.
func audioMime(part *multipart.Part, head []byte) string {
	if ct := part.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err == nil && (strings.HasPrefix(mt, "audio/") || mt == "video/webm" || mt == "video/mp4") {
			if mt == "video/mp4" {
				return "audio/mp4"
			}
			return mt
		}
	}
	if mt, ok := audioMimeByExt[strings.ToLower(path.Ext(part.FileName()))]; ok {
		return mt
	}
	if mt, _, _ := mime.ParseMediaType(http.DetectContentType(head)); strings.HasPrefix(mt, "audio/") || mt == "video/webm" {
		if mt == "audio/wave" {
			mt = "audio/wav"
		}
		return mt
	}
	return ""
}

// readTranscriptionForm streams the multipart body, holding at most
// maxMedia bytes of audio and maxFormField per text field.
func readTranscriptionForm(r *http.Request, maxMedia int64) (*transcriptionForm, *apiError) {
	mr, err := r.MultipartReader()
	if err != nil {
		return nil, badRequest("", "invalid_content_type", "Expected a multipart/form-data body with 'file' and 'model'.")
	}
	f := &transcriptionForm{}
	seenFile := false
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			var (
				mbe *http.MaxBytesError
				ne  net.Error
			)
			switch {
			case errors.As(err, &mbe):
				return nil, bodyError(err, mbe.Limit)
			case errors.As(err, &ne): // a timeout, a broken connection
				return nil, bodyError(err, 0)
			}
			return nil, badRequest("", "invalid_body", "Malformed multipart body: %v.", err)
		}
		name := part.FormName()
		if name == "file" {
			if seenFile {
				return nil, badRequest("file", "invalid_value", "Only one 'file' may be sent.")
			}
			seenFile = true
			// Toward the whole body's size at most, reserved as it grows.
			hint := int64(-1)
			if n := r.ContentLength; n > 0 {
				hint = min(n, maxMedia+1)
			}
			data, err := readAll(io.LimitReader(part, maxMedia+1), hint, reservationOf(r))
			if err != nil {
				return nil, bodyError(err, maxMedia)
			}
			if int64(len(data)) > maxMedia {
				return nil, tooLarge("file", "The audio file is larger than the limit of %d bytes.", maxMedia)
			}
			if len(data) == 0 {
				return nil, badRequest("file", "invalid_value", "The audio file is empty.")
			}
			f.audio = data
			f.mime = audioMime(part, data[:min(len(data), 512)])
			if f.mime == "" {
				return nil, badRequest("file", "invalid_value", "Unrecognised audio format for %q (send flac, m4a, mp3, mp4, mpeg, mpga, ogg, wav or webm).", part.FileName())
			}
			continue
		}
		b, err := io.ReadAll(io.LimitReader(part, maxFormField+1))
		if err != nil {
			return nil, bodyError(err, maxFormField)
		}
		if len(b) > maxFormField {
			return nil, badRequest(name, "invalid_value", "Field %q is longer than %d bytes.", name, maxFormField)
		}
		v := string(b)
		switch name {
		case "model":
			f.model = v
		case "prompt":
			f.prompt = v
		case "language":
			f.language = v
		case "response_format":
			f.responseFormat = v
		case "stream":
			bv, err := strconv.ParseBool(v)
			if err != nil {
				return nil, badRequest("stream", "invalid_type", "Invalid type for 'stream': expected a boolean.")
			}
			f.stream = bv
		case "temperature":
			t, err := strconv.ParseFloat(v, 32)
			if err != nil {
				return nil, badRequest("temperature", "invalid_type", "Invalid type for 'temperature': expected a number.")
			}
			t32 := float32(t)
			f.temperature = &t32
		}
	}
	if !seenFile {
		return nil, badRequest("file", "missing_required_parameter", "Missing required parameter: 'file'.")
	}
	if f.model == "" {
		return nil, badRequest("model", "missing_required_parameter", "Missing required parameter: 'model'.")
	}
	switch f.responseFormat {
	case "", "json", "text":
	default:
		return nil, badRequest("response_format", "unsupported_value", "Invalid value for 'response_format': %q (want json or text).", f.responseFormat)
	}
	if f.stream {
		return nil, badRequest("stream", "unsupported_value", "Streaming transcription is not supported.")
	}
	return f, nil
}

func (s *Server) handleTranscription(w http.ResponseWriter, r *http.Request) {
	done := limitBody(w, r, s.cfg.maxBody, s.cfg.bodyTimeout)
	f, aerr := readTranscriptionForm(r, s.cfg.maxMedia)
	done(aerr != nil)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	q := &pb.QueryRequest{Id: newID(), Type: pb.QueryType_QUERY_TYPE_STT, Model: f.model, Prompt: f.prompt,
		Attachments: []*pb.Attachment{{Mime: f.mime, Data: f.audio}}}
	if f.temperature != nil {
		q.Params = &pb.Params{Temperature: f.temperature}
	}
	if aerr := s.checkModel(q.Model, q.Type); aerr != nil {
		writeError(w, aerr)
		return
	}
	text, res, aerr := s.collectText(r, q)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	w.Header().Set(peerHeader, res.PeerString())
	if f.responseFormat == "text" {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Content-Length", strconv.Itoa(len(text)))
		writeBody(w, []byte(text))
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Text string    `json:"text"`
		Mtor *mtorInfo `json:"mtor,omitempty"`
	}{text, infoOf(res)})
}

type speechRequest struct {
	Model          string   `json:"model"`
	Input          string   `json:"input"`
	Voice          string   `json:"voice"`
	ResponseFormat string   `json:"response_format"`
	Speed          *float64 `json:"speed"`
	StreamFormat   string   `json:"stream_format"`
}

func speechToQuery(req *speechRequest) (*pb.QueryRequest, *apiError) {
	if req.Model == "" {
		return nil, badRequest("model", "missing_required_parameter", "Missing required parameter: 'model'.")
	}
	if strings.TrimSpace(req.Input) == "" {
		return nil, badRequest("input", "missing_required_parameter", "Missing required parameter: 'input'.")
	}
	if n := len([]rune(req.Input)); n > maxSpeechInput {
		return nil, badRequest("input", "invalid_value", "'input' is %d characters, limit %d.", n, maxSpeechInput)
	}
	if len(req.Voice) > 64 {
		return nil, badRequest("voice", "invalid_value", "'voice' is too long.")
	}
	switch req.ResponseFormat {
	case "", "mp3", "opus", "aac", "flac", "wav", "pcm":
	default:
		return nil, badRequest("response_format", "invalid_value", "Invalid value for 'response_format': %q.", req.ResponseFormat)
	}
	if req.StreamFormat != "" && req.StreamFormat != "audio" {
		return nil, badRequest("stream_format", "unsupported_value", "Only stream_format \"audio\" is supported.")
	}
	if req.Speed != nil && (*req.Speed < 0.25 || *req.Speed > 4) {
		return nil, badRequest("speed", "invalid_value", "Invalid value for 'speed': %v (want 0.25 to 4).", *req.Speed)
	}
	return &pb.QueryRequest{Id: newID(), Type: pb.QueryType_QUERY_TYPE_TTS, Model: req.Model, Prompt: req.Input,
		Params: &pb.Params{Voice: req.Voice, Format: req.ResponseFormat}}, nil
}

func (s *Server) handleSpeech(w http.ResponseWriter, r *http.Request) {
	var req speechRequest
	q := decodeQuery(s, w, r, &req, speechToQuery)
	if q == nil {
		return
	}
	// A worker may send its audio in pieces, to be joined; the router's
	// output budget bounds their sum.
	var (
		audio protocol.Audio
		mixed bool
	)
	res, aerr := s.queryWhole(r.Context(), q, func() { audio, mixed = protocol.Audio{}, false }, func(ev *pb.Event) error {
		if m := ev.GetMedia(); m != nil && !audio.Add(m.GetMime(), m.GetData()) {
			mixed = true
		}
		return nil
	})
	switch {
	case aerr != nil:
		writeError(w, aerr)
		return
	case audio.Pieces == 0:
		writeError(w, &apiError{Status: http.StatusBadGateway, Type: typeServer, Code: "backend_error", Message: "The worker returned no audio."})
		return
	case mixed:
		writeError(w, &apiError{Status: http.StatusBadGateway, Type: typeServer, Code: "backend_error", Message: "The worker returned audio pieces of different formats."})
		return
	}
	// The worker's format wins over response_format: the bridge does not
	// transcode, and Content-Type says what came.
	h := w.Header()
	h.Set(peerHeader, res.PeerString())
	h.Set("Content-Type", audio.Mime)
	h.Set("Content-Length", strconv.Itoa(len(audio.Data)))
	w.WriteHeader(http.StatusOK)
	writeBody(w, audio.Data)
}

// collectText runs q and gathers its chunks.
func (s *Server) collectText(r *http.Request, q *pb.QueryRequest) (string, *router.Result, *apiError) {
	var b strings.Builder
	var overflow *apiError
	res, aerr := s.queryWhole(r.Context(), q, b.Reset, func(ev *pb.Event) error {
		if c := ev.GetChunk(); c != nil {
			if b.Len()+len(c.GetText()) > s.cfg.maxAnswer {
				overflow = responseTooLarge(s.cfg.maxAnswer, "")
				return overflow
			}
			b.WriteString(c.GetText())
		}
		return nil
	})
	if overflow != nil {
		return "", nil, overflow
	}
	return b.String(), res, aerr
}
