// Package scrub removes network addresses from text a client will read:
// worker and transport errors quote them (a dial error names the peer's
// IP and port), and the bridge never shows where a peer lives. Both the
// HTTP API (package bridge) and the WebSocket (package bridge/ws) send
// error text through Addresses.
package scrub

import "regexp"

// Placeholder replaces every address.
const Placeholder = "[address]"

// h is one group of an IPv6 address.
const h = `[0-9a-fA-F]{1,4}`

// addrRe matches, leftmost alternative first: URLs, multiaddrs, bracketed
// IPv6 with optional port, IPv4 with optional port, hostname:port, and bare
// IPv6 (all eight groups, or compressed with "::"; an embedded IPv4 and a
// zone allowed).
//
// The word boundaries keep look-alikes: "std::io" and "12:30:45" are no
// IPv6, "history[1]" is no bracketed address. RE2 has no look-ahead, so
// the character after a hostname:port is matched (group tail) and put
// back: it must be neither ":" (an IPv6 then) nor "." and a digit, so that
// a model tag such as "phi3:3.8b" stays.
var addrRe = regexp.MustCompile(
	`[a-zA-Z][a-zA-Z0-9+.-]*://[^\s"'<>]+` +
		`|/(?:ip4|ip6|ip6zone|dns|dns4|dns6|dnsaddr|unix)/[^\s"'<>]+` +
		`|\[[0-9a-fA-F]*:[0-9a-fA-F:.]*(?:%[\w.-]+)?\](?::\d+)?` +
		`|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b` +
		`|\b[a-zA-Z][\w-]*(?:\.[\w-]+)*:\d{1,5}(?P<tail>$|[^\w.:]|\.(?:$|\D))` +
		`|(?:\b(?:(?:` + h + `:){7}` + h + `|(?:` + h + `:){1,7}(?::` + h + `){1,7})` +
		`|\B::(?:` + h + `:){0,6}` + h + `)(?:(?:\.\d{1,3}){3})?(?:%[\w.-]+)?\b` +
		`|\b(?:` + h + `:){1,7}:\B`)

// Addresses returns s with every network address in it (URL, multiaddr,
// IPv4 or IPv6 with or without port, hostname:port) replaced by
// Placeholder.
func Addresses(s string) string {
	return addrRe.ReplaceAllString(s, Placeholder+"${tail}")
}
