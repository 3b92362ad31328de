// Package spec turns a --backend value into a backend.
//
//	demo[:delay=DURATION,model=NAME]
//	ollama=URL
//	openai=URL[,key=KEY|key=env:VAR|key=file:PATH][,types=MODEL:chat+vision;MODEL2:embed]
//	          [,features=tools+json_object+json_schema+logprobs+continue]
//	rentahal=URL[,model=NAME][,types=chat+vision+...]
//	a1111=URL
package spec

import (
	"fmt"
	"net/url"
	"os"
	"strings"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/a1111"
	"github.com/mtor-swarm/mtor/node/backend/demo"
	"github.com/mtor-swarm/mtor/node/backend/rentahal"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Kinds lists the accepted backend kinds, for help texts.
const Kinds = "demo, ollama=URL, openai=URL, rentahal=URL, a1111=URL"

// Parse builds the backend a spec names. label identifies this node in
// the demo backend's answers.
func Parse(s, label string) (backend.Backend, error) {
	s = strings.TrimSpace(s)
	if s == "demo" || strings.HasPrefix(s, "demo:") {
		opts, err := demo.ParseOptions(strings.TrimPrefix(strings.TrimPrefix(s, "demo"), ":"))
		if err != nil {
			return nil, err
		}
		return demo.New(label, opts...), nil
	}
	kind, rest, ok := strings.Cut(s, "=")
	if !ok {
		return nil, fmt.Errorf("backend %q: want KIND=URL or demo (kinds: %s)", s, Kinds)
	}
	// The kind first: "foo=bar" is an unknown kind, not a bad URL.
	if !knownKind(kind) {
		return nil, fmt.Errorf("backend %q: unknown backend kind %q (kinds: %s)", s, kind, Kinds)
	}
	rawURL, params, err := splitParams(rest)
	if err != nil {
		return nil, fmt.Errorf("backend %q: %w", s, err)
	}
	if u, err := url.Parse(rawURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("backend %q: %q is not an http(s) URL", s, rawURL)
	}
	b, err := build(kind, rawURL, params)
	if err != nil {
		return nil, fmt.Errorf("backend %q: %w", s, err)
	}
	return b, nil
}

// splitParams splits "URL,k=v,k=v".
func splitParams(s string) (string, map[string]string, error) {
	parts := strings.Split(s, ",")
	params := map[string]string{}
	for _, p := range parts[1:] {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return "", nil, fmt.Errorf("parameter %q: want key=value", p)
		}
		params[k] = v
	}
	return parts[0], params, nil
}

func unknown(params map[string]string, allowed ...string) error {
	for k := range params {
		ok := false
		for _, a := range allowed {
			ok = ok || a == k
		}
		if !ok {
			return fmt.Errorf("unknown parameter %q", k)
		}
	}
	return nil
}

// secret resolves key=VALUE, key=env:VAR or key=file:PATH, so that keys
// need not appear in process listings.
func secret(v string) (string, error) {
	switch {
	case strings.HasPrefix(v, "env:"):
		s, ok := os.LookupEnv(strings.TrimPrefix(v, "env:"))
		if !ok {
			return "", fmt.Errorf("environment variable %s is not set", strings.TrimPrefix(v, "env:"))
		}
		return s, nil
	case strings.HasPrefix(v, "file:"):
		b, err := os.ReadFile(strings.TrimPrefix(v, "file:"))
		if err != nil {
			return "", fmt.Errorf("read key: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}
	return v, nil
}

func build(kind, u string, params map[string]string) (backend.Backend, error) {
	switch kind {
	case "rentahal":
		if err := unknown(params, "model", "types"); err != nil {
			return nil, err
		}
		var opts []rentahal.Option
		if m, ok := params["model"]; ok {
			if err := protocol.ValidateModelName(m); err != nil {
				return nil, err
			}
			opts = append(opts, rentahal.WithModel(m))
		}
		if ts, ok := params["types"]; ok {
			var types []pb.QueryType
			for _, t := range strings.Split(ts, "+") {
				qt, err := protocol.ParseType(t)
				if err != nil {
					return nil, err
				}
				types = append(types, qt)
			}
			opts = append(opts, rentahal.WithTypes(types...))
		}
		return rentahal.New(u, opts...)
	case "a1111":
		if err := unknown(params); err != nil {
			return nil, err
		}
		return a1111.New(u)
	}
	return buildHTTP(kind, u, params)
}

// knownKind reports whether kind is one of the KIND=URL kinds of Kinds.
func knownKind(kind string) bool {
	switch kind {
	case "ollama", "openai", "rentahal", "a1111":
		return true
	}
	return false
}
