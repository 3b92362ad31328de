package openai

import (
	"strings"
	"testing"

	"github.com/mtor-swarm/mtor/protocol/pb"
)

// TestContentParts: a message's images stand where Attachment.at puts
// them in its text, the "\n" that joined the text parts around one left
// out; unplaced images (a sender before the field) follow the text.
func TestContentParts(t *testing.T) {
	at := func(n uint32) *uint32 { return &n }
	img := func(mime string, place *uint32) *pb.Attachment {
		return &pb.Attachment{Mime: mime, Data: []byte{1}, At: place}
	}
	for _, tc := range []struct {
		name   string
		text   string
		images []*pb.Attachment
		want   string
	}{
		{"unplaced follow the text", "what?", []*pb.Attachment{img("image/png", nil), img("image/gif", nil)}, "T(what?) I(image/png) I(image/gif)"},
		{"between two parts", "A\nB", []*pb.Attachment{img("image/png", at(1))}, "T(A) I(image/png) T(B)"},
		{"first and last", "A", []*pb.Attachment{img("image/png", at(0)), img("image/gif", at(1))}, "I(image/png) T(A) I(image/gif)"},
		{"two in one place, a part that begins with a line break after", "A\n\nB", []*pb.Attachment{img("image/png", at(1)), img("image/gif", at(1))}, "T(A) I(image/png) I(image/gif) T(\nB)"},
		{"line breaks inside a part kept", "x\ny\nz", []*pb.Attachment{img("image/png", at(3))}, "T(x\ny) I(image/png) T(z)"},
		{"images only", "", []*pb.Attachment{img("image/png", at(0)), img("image/gif", at(0))}, "I(image/png) I(image/gif)"},
		{"a place past the text kept at its end", "A", []*pb.Attachment{img("image/png", at(9))}, "T(A) I(image/png)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parts, err := contentParts(tc.text, tc.images)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, p := range parts {
				if p.Type == "text" {
					got = append(got, "T("+p.Text+")")
				} else {
					mime, _, _ := strings.Cut(strings.TrimPrefix(p.ImageURL.URL, "data:"), ";")
					got = append(got, "I("+mime+")")
				}
			}
			if g := strings.Join(got, " "); g != tc.want {
				t.Fatalf("parts %s, want %s", g, tc.want)
			}
		})
	}
	if _, err := contentParts("x", []*pb.Attachment{img("audio/wav", nil)}); err == nil {
		t.Fatal("an audio attachment in a chat message was taken")
	}
}
