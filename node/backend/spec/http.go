package spec

import (
	"fmt"

	"github.com/mtor-swarm/mtor/node/backend"
)

// buildHTTP builds the ollama and openai backends.
func buildHTTP(kind, u string, params map[string]string) (backend.Backend, error) {
	return nil, fmt.Errorf("unknown backend kind %q (kinds: %s)", kind, Kinds)
}
