package main

import (
	"context"
	"fmt"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/detect"
	"github.com/mtor-swarm/mtor/node/backend/spec"
)

// detectBackends looks for model servers on their usual local ports and
// says plainly what it found; finding nothing is not an error: the node
// still joins and routes.
func detectBackends(ctx context.Context, e *env, label string) ([]backend.Backend, error) {
	found := detect.Detect(ctx)
	var out []backend.Backend
	for _, f := range found {
		s := f.Kind + "=" + f.URL
		b, err := spec.Parse(s, label)
		if err != nil {
			fmt.Fprintf(e.stderr, "warning: detected %s but cannot use it: %v\n", s, err)
			continue
		}
		fmt.Fprintf(e.stdout, "detected: %s\n", f)
		out = append(out, b)
	}
	if len(out) == 0 {
		fmt.Fprintf(e.stdout, "detected: no local model server (looked for Ollama and OpenAI-compatible servers on their default ports); pass --backend to serve one\n")
	}
	return out, nil
}
