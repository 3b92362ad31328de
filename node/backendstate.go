package node

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/protocol"
)

// Backend states as an operator reads them.
const (
	BackendStarting = "starting" // not probed yet
	BackendUp       = "up"
	BackendDown     = "down"
)

// BackendState is what the operator needs to know about one backend: is it
// answering, and if not, why.
type BackendState struct {
	Name   string   `json:"name"`
	Kind   string   `json:"kind"`
	State  string   `json:"state"`            // starting, up, down
	Detail string   `json:"detail,omitempty"` // why it is down: "unreachable (connection refused)"
	Models []string `json:"models,omitempty"` // what it serves while up
}

// String is one line for people: "ollama http://… up: 3 models",
// "ollama http://… unreachable (connection refused)".
func (s BackendState) String() string {
	switch s.State {
	case BackendUp:
		switch len(s.Models) {
		case 0:
			return s.Name + " up: no models (the server lists none)"
		case 1:
			return s.Name + " up: 1 model (" + s.Models[0] + ")"
		}
		if len(s.Models) <= 4 {
			return fmt.Sprintf("%s up: %d models (%s)", s.Name, len(s.Models), strings.Join(s.Models, ", "))
		}
		return fmt.Sprintf("%s up: %d models", s.Name, len(s.Models))
	case BackendDown:
		return s.Name + " " + s.Detail
	}
	return s.Name + " " + s.State
}

// watchedBackend records what the worker's probes learn about a backend,
// so that the node can say it at once instead of in a debug log. The
// worker probes (Probe, then Models) every health probe interval.
type watchedBackend struct {
	backend.Backend
	onChange func(prev, next BackendState)

	mu sync.Mutex
	st BackendState
}

func watchBackend(b backend.Backend, onChange func(prev, next BackendState)) *watchedBackend {
	return &watchedBackend{Backend: b, onChange: onChange,
		st: BackendState{Name: b.Name(), Kind: b.Kind(), State: BackendStarting}}
}

func (w *watchedBackend) Probe(ctx context.Context) error {
	err := w.Backend.Probe(ctx)
	if err != nil && ctx.Err() == nil {
		w.set(w.down(err))
	}
	return err
}

func (w *watchedBackend) Models(ctx context.Context) ([]backend.Model, error) {
	ms, err := w.Backend.Models(ctx)
	switch {
	case err != nil && ctx.Err() == nil:
		w.set(w.down(err))
	case err == nil:
		st := BackendState{Name: w.Name(), Kind: w.Kind(), State: BackendUp, Models: []string{}}
		for _, m := range ms {
			st.Models = append(st.Models, m.Name)
		}
		w.set(st)
	}
	return ms, err
}

func (w *watchedBackend) down(err error) BackendState {
	return BackendState{Name: w.Name(), Kind: w.Kind(), State: BackendDown, Detail: describeBackendError(err)}
}

func (w *watchedBackend) state() BackendState {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.st
}

func (w *watchedBackend) set(next BackendState) {
	w.mu.Lock()
	prev := w.st
	w.st = next
	w.mu.Unlock()
	if prev.String() != next.String() && w.onChange != nil {
		w.onChange(prev, next)
	}
}

// describeBackendError turns a probe failure into a few words: the
// backends' errors say "backend unreachable: connection refused",
// "backend answered 500: …", "backend timed out".
func describeBackendError(err error) string {
	msg := protocol.AsError(err).Message
	msg = strings.TrimPrefix(msg, "backend ")
	if rest, ok := strings.CutPrefix(msg, "unreachable: "); ok {
		return "unreachable (" + rest + ")"
	}
	return "failing (" + msg + ")"
}
