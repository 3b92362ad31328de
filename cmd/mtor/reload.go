package main

import (
	"context"
	"fmt"
	"strconv"

	"github.com/mtor-swarm/mtor/cmd/mtor/config"
	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/spec"
)

// backendSet builds backends from --backend values and keeps them by
// value, so that a reload hands the node the same backend for an unchanged
// value: the node keeps it, with its health, instead of replacing it.
type backendSet struct {
	label  string
	bySpec map[string]backend.Backend
}

func newBackendSet(label string) *backendSet {
	return &backendSet{label: label, bySpec: map[string]backend.Backend{}}
}

// build parses specs, reusing the backends of values seen before; it
// forgets the others.
func (s *backendSet) build(specs []string) ([]backend.Backend, error) {
	next := map[string]backend.Backend{}
	out := make([]backend.Backend, 0, len(specs))
	for _, v := range specs {
		if _, dup := next[v]; dup {
			continue
		}
		b := s.bySpec[v]
		if b == nil {
			var err error
			if b, err = spec.Parse(v, s.label); err != nil {
				return nil, usagef("--backend: %v", err)
			}
		}
		next[v] = b
		out = append(out, b)
	}
	s.bySpec = next
	return out, nil
}

// backendSource says where a node's backends come from, so that SIGHUP can
// look again: the command line's --backend (or --no-detect), else the
// config file's, else detection.
type backendSource struct {
	cliSpecs    []string // --backend on the command line
	cliNoDetect bool     // --no-detect on the command line
	fromCLI     bool     // either was given: the config file is not read for them
	configPath  string
}

// specs returns the --backend values to serve now; a config file that
// does not read well is an error, and the caller keeps what it has.
func (src backendSource) specs(ctx context.Context, e *env) ([]string, error) {
	specs, noDetect := src.cliSpecs, src.cliNoDetect
	if !src.fromCLI && src.configPath != "" {
		cf, err := config.Load(src.configPath)
		if err != nil {
			return nil, err
		}
		// The whole file is checked as at start (a key that is no
		// flag, a bad value), though only its backends are used.
		if err := cf.Apply(nodeFlagSet(e, &nodeFlags{}), func(string) bool { return false }, "config"); err != nil {
			return nil, err
		}
		specs = cf.Values["backend"]
		if v := cf.Values["no-detect"]; len(v) == 1 {
			if noDetect, err = strconv.ParseBool(v[0]); err != nil {
				return nil, &config.KeyError{Path: src.configPath, Key: "no-detect", Err: fmt.Errorf("%w: %v", config.ErrValue, err)}
			}
		}
		if noDetect && len(specs) > 0 {
			return nil, fmt.Errorf("config %s: no-detect and backend exclude each other", src.configPath)
		}
	}
	for _, v := range specs {
		if _, err := spec.Parse(v, ""); err != nil {
			return nil, fmt.Errorf("backend: %w", err)
		}
	}
	if len(specs) == 0 && !noDetect {
		specs = detectSpecs(ctx, e)
	}
	return specs, nil
}

// reloadBackends is SIGHUP: read the backends again and give the node the
// new list. What it changed is said on stdout; a failure on stderr, and
// the node keeps serving what it had.
func reloadBackends(ctx context.Context, e *env, n *node.Node, src backendSource, set *backendSet, out *noticePrinter) {
	specs, err := src.specs(ctx, e)
	var bs []backend.Backend
	if err == nil {
		bs, err = set.build(specs)
	}
	if err != nil {
		out.warn(fmt.Sprintf("reload: %v; the backends stay as they were", err))
		return
	}
	r := n.SetBackends(ctx, bs)
	from := "the command line"
	switch {
	case !src.fromCLI && src.configPath != "":
		from = src.configPath
	case !src.fromCLI:
		from = "detection"
	}
	out.line(fmt.Sprintf("reload: backends from %s: %d added, %d removed, %d kept", from, len(r.Added), len(r.Removed), r.Kept))
}
