package spec

import (
	"fmt"
	"strings"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/ollama"
	"github.com/mtor-swarm/mtor/node/backend/openai"
	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// buildHTTP builds the ollama and openai backends.
func buildHTTP(kind, u string, params map[string]string) (backend.Backend, error) {
	switch kind {
	case "ollama":
		if err := unknown(params); err != nil {
			return nil, err
		}
		return ollama.New(u)
	case "openai":
		if err := unknown(params, "key", "types", "features"); err != nil {
			return nil, err
		}
		var opts []openai.Option
		if k, ok := params["key"]; ok {
			key, err := secret(k)
			if err != nil {
				return nil, err
			}
			opts = append(opts, openai.WithAPIKey(key))
		}
		if ts, ok := params["types"]; ok {
			// types=MODEL:chat+vision;MODEL2:embed
			m := map[string][]pb.QueryType{}
			for _, entry := range strings.Split(ts, ";") {
				// Model names may hold ':' (llama3.1:8b); the last one
				// separates the types.
				i := strings.LastIndex(entry, ":")
				name, list, ok := entry[:max(i, 0)], entry[i+1:], i > 0
				if !ok {
					return nil, fmt.Errorf("types entry %q: want MODEL:type+type", entry)
				}
				for _, t := range strings.Split(list, "+") {
					qt, err := protocol.ParseType(t)
					if err != nil {
						return nil, err
					}
					m[name] = append(m[name], qt)
				}
			}
			opts = append(opts, openai.WithModelTypes(m))
		}
		if fs, ok := params["features"]; ok {
			// features=tools+json_schema+json_object+logprobs+continue
			opts = append(opts, openai.WithFeatures(strings.Split(fs, "+")...))
		}
		return openai.New(u, opts...)
	}
	return nil, fmt.Errorf("unknown backend kind %q (kinds: %s)", kind, Kinds)
}
