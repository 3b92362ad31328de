package main

import (
	"context"
	"fmt"

	"github.com/mtor-swarm/mtor/node/backend/detect"
	"github.com/mtor-swarm/mtor/node/backend/spec"
)

// detectSpecs looks for model servers on their usual local ports, says
// plainly what it found and returns their --backend values; finding
// nothing is not an error: the node still joins and routes.
func detectSpecs(ctx context.Context, e *env) []string {
	found := detect.Detect(ctx)
	var out []string
	for _, f := range found {
		s := f.Kind + "=" + f.URL
		if _, err := spec.Parse(s, ""); err != nil {
			fmt.Fprintf(e.stderr, "warning: detected %s but cannot use it: %v\n", s, err)
			continue
		}
		fmt.Fprintf(e.stdout, "detected: %s\n", f)
		out = append(out, s)
	}
	if len(out) == 0 {
		fmt.Fprintf(e.stdout, "detected: no local model server (looked for Ollama and OpenAI-compatible servers on their default ports); pass --backend to serve one\n")
	}
	return out
}
