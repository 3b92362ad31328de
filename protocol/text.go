package protocol

import (
	"strings"
	"unicode"
	"unicode/utf8"
)

// CleanText makes text from another process (a backend's error, a
// worker's message) safe to show a client: valid UTF-8, control
// characters (a terminal's escape sequences) and runs of white space as
// one space, trimmed, at most n bytes.
func CleanText(s string, n int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	return ClipText(strings.Join(strings.Fields(s), " "), n)
}

// ClipText shortens s to at most n bytes of valid UTF-8, marking a cut
// with "…".
func ClipText(s string, n int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}
