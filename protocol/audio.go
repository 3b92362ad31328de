package protocol

// Audio gathers the answer to a tts query: one or more Media pieces of one
// type, concatenated in order (docs/protocol.md, section 5.1). The zero
// value is empty; the data is its own, not the events'.
type Audio struct {
	Mime   string
	Data   []byte
	Pieces int
}

// Add appends a piece. A piece of another type than the first is no part
// of the same audio: Add reports false and keeps nothing of it.
func (a *Audio) Add(mime string, data []byte) bool {
	if a.Pieces > 0 && mime != a.Mime {
		return false
	}
	a.Mime = mime
	a.Data = append(a.Data, data...)
	a.Pieces++
	return true
}
