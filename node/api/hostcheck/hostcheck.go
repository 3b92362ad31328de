// Package hostcheck decides whether a request's Host header names the
// server it reached: the defence against DNS rebinding, where a foreign web
// page points its own name (evil.example) at 127.0.0.1 so that the user's
// browser sends it to a local server as a same-origin request. The browser
// still sends Host: evil.example, so a server that answers only to its own
// names is out of the page's reach. The control API (package node/api) and
// the bridge (package bridge) share this check.
package hostcheck

import (
	"errors"
	"fmt"
	"net"
	"strings"
)

// Hostname is the host part of a Host header or host:port, lower case,
// without brackets or a trailing dot.
func Hostname(hostport string) string {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		host = hostport
	}
	host = strings.TrimSuffix(strings.Trim(host, "[]"), ".")
	return strings.ToLower(host)
}

// Loopback reports whether hostport (a Host header) names this machine's
// loopback interface: "localhost" or a loopback IP. A DNS rebinding page
// cannot make a browser send either, since neither is its own name.
func Loopback(hostport string) bool {
	host := Hostname(hostport)
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// LoopbackAddr reports whether addr (a RemoteAddr, IP:port) is a loopback
// IP.
func LoopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Allow is the set of Host names a server answers to: loopback always, the
// IP address a connection arrived on, and the names it was given. The zero
// value allows loopback and the connection's address only.
type Allow struct {
	names map[string]bool
	any   bool
}

// ErrBadName is returned by New for a name that is not a host name.
var ErrBadName = errors.New("not a host name")

// New allows names (host or host:port; the port is ignored, since a proxy
// may forward another port than the one the browser used) besides
// loopback. "*" allows every name: only for a server no browser can reach
// or one that authenticates every request.
func New(names ...string) (*Allow, error) {
	a := &Allow{names: map[string]bool{}}
	for _, n := range names {
		n = strings.TrimSpace(n)
		if n == "*" {
			a.any = true
			continue
		}
		h := Hostname(n)
		if h == "" || strings.ContainsAny(h, "/@?#%\\ \t") || strings.Contains(n, "://") {
			return nil, fmt.Errorf("host %q: %w (want a name or address such as gpu.example or gpu.example:8080)", n, ErrBadName)
		}
		a.names[h] = true
	}
	return a, nil
}

// Any reports whether every name is allowed.
func (a *Allow) Any() bool { return a != nil && a.any }

// Allowed reports whether hostport (a Host or X-Forwarded-Host header) is
// one of the server's names. local is the address the request's
// connection arrived on, or nil: an IP literal equal to it is allowed, so a
// server bound to 0.0.0.0 answers to each of its addresses. An IP literal
// is never the work of DNS rebinding, which needs a name the page owns.
func (a *Allow) Allowed(hostport string, local net.Addr) bool {
	if a.Any() || Loopback(hostport) {
		return true
	}
	host := Hostname(hostport)
	if host == "" {
		return false
	}
	if a != nil && a.names[host] {
		return true
	}
	if ip := net.ParseIP(host); ip != nil && local != nil {
		if lip := addrIP(local); lip != nil && lip.Equal(ip) {
			return true
		}
	}
	return false
}

// addrIP is the IP of a net.Addr, or nil.
func addrIP(a net.Addr) net.IP {
	switch v := a.(type) {
	case *net.TCPAddr:
		return v.IP
	case *net.UDPAddr:
		return v.IP
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return nil
	}
	return net.ParseIP(host)
}
