package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/router"
)

func runPeers(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "peers", "[--api HOST:PORT] [--json]")
	apiAddr := fs.String("api", defaultAPIAddr(e), "control API of a running node (env MTOR_API)")
	asJSON := fs.Bool("json", false, "print the peer table as JSON")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	peers, err := api.NewClient(*apiAddr).Peers(ctx)
	if err != nil {
		return explain(err, *apiAddr)
	}
	sort.Slice(peers, func(i, j int) bool { return peers[i].Peer < peers[j].Peer })
	if *asJSON {
		if peers == nil {
			peers = []api.Peer{}
		}
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(peers)
	}
	return printPeers(e.stdout, peers)
}

// printPeers writes the peer table for people: one line per worker, this
// node's own line (even when it serves nothing) and relays; then the
// state of this node's backends, so that an operator sees why it serves
// what it serves.
func printPeers(w io.Writer, peers []api.Peer) error {
	workers := 0
	var own []node.BackendState
	for _, p := range peers {
		if len(p.Models) > 0 {
			workers++
		}
		if p.Self {
			own = p.Backends
		}
	}
	if len(peers) > 0 {
		if err := printPeerTable(w, peers); err != nil {
			return err
		}
	}
	for _, b := range own {
		fmt.Fprintf(w, "this node's backend: %s\n", b)
	}
	if workers == 0 {
		_, err := fmt.Fprintln(w, "no workers known yet: no peer serves a model")
		return err
	}
	return nil
}

func printPeerTable(w io.Writer, peers []api.Peer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tMODELS\tTYPES\tLOAD\tHEALTH\tREP\tREACH\tPATH\tGPU\tAGE")
	for _, p := range peers {
		id := p.Peer
		var marks []string
		if p.Self {
			marks = append(marks, "self")
		}
		if p.Relay {
			marks = append(marks, "relay")
		}
		if len(marks) > 0 {
			id += " (" + strings.Join(marks, ", ") + ")"
		}
		var models []string
		typeSet := map[string]bool{}
		var types []string
		for _, m := range p.Models {
			name := m.Name
			if m.JoulesPerToken > 0 {
				// Measured energy, what --prefer-energy routes by.
				name += fmt.Sprintf(" (%.3g J/token)", m.JoulesPerToken)
			}
			if m.Breaker != "" {
				// Banned from this model here (it kept failing it).
				name += " (" + m.Breaker + ")"
			}
			models = append(models, name)
			for _, t := range m.Types {
				if !typeSet[t] {
					typeSet[t] = true
					types = append(types, t)
				}
			}
		}
		if len(p.Models) == 0 {
			// Not a worker: this node serving nothing, or a relay.
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t%s\t%s\t%s\t%s\n", id, reach(p.PeerView), pathOf(p.PeerView), orDash(gpuSummary(p.GPUs)), age(p))
			continue
		}
		load := fmt.Sprintf("%d/%d", p.InFlight, p.MaxConcurrency)
		if p.Queued > 0 {
			load += fmt.Sprintf(" +%d queued", p.Queued)
		}
		if p.Draining {
			load += " draining"
		}
		health := fmt.Sprintf("%d", p.Health)
		if p.Breaker != "" && p.Breaker != "closed" {
			health += " (" + p.Breaker + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", id, orDash(strings.Join(models, ",")), orDash(strings.Join(types, ",")),
			load, health, reputation(p), reach(p.PeerView), pathOf(p.PeerView), orDash(gpuSummary(p.GPUs)), age(p))
	}
	return tw.Flush()
}

// reach is how others reach the peer: public, relayed via which relays
// (short IDs), private (its LAN only).
func reach(p router.PeerView) string {
	if p.Reachability == "relayed" {
		var ids []string
		for _, r := range p.RelayedVia {
			ids = append(ids, shortPeer(r))
		}
		return "relayed via " + strings.Join(ids, ",")
	}
	return orDash(p.Reachability)
}

// pathOf is how this node is connected to the peer: direct (after a hole
// punch or not, with the transports of the direct connections), or
// relayed through which relay; "-" when not connected.
func pathOf(p router.PeerView) string {
	switch {
	case p.Self:
		return "-"
	case p.Unreachable:
		return "unreachable"
	case p.Path == "direct":
		var notes []string
		if p.HolePunched {
			notes = append(notes, "hole punch")
		}
		notes = append(notes, p.Transports...)
		if len(notes) == 0 {
			return "direct"
		}
		return "direct (" + strings.Join(notes, ", ") + ")"
	case p.Path == "relayed":
		return "relayed via " + shortPeer(p.Relay)
	}
	return orDash(p.Path)
}

// shortPeer is the end of a peer ID, as the start-up banner shows relays.
func shortPeer(id string) string {
	if len(id) > 8 {
		return id[len(id)-8:]
	}
	return id
}

// age is how old a row's announcement is; "-" for this node's own row
// when it announces nothing.
func age(p api.Peer) string {
	if p.Self && len(p.Models) == 0 {
		return "-"
	}
	return (time.Duration(p.AgeMs) * time.Millisecond).Round(100 * time.Millisecond).String()
}

// gpuSummary is one short line per GPU: name, free/total VRAM, use, power.
func gpuSummary(gs []router.GPUView) string {
	var parts []string
	for _, g := range gs {
		parts = append(parts, fmt.Sprintf("%s %.1f/%.1fGiB free %d%% %.0fW", g.Name,
			float64(g.VRAMFree)/(1<<30), float64(g.VRAMTotal)/(1<<30), g.UtilPercent, float64(g.PowerMW)/1000))
	}
	return strings.Join(parts, "; ")
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// reputation is the REP column: how far honesty spot checks trust the
// peer's answers, 0..100, marked when it gets no traffic for it.
func reputation(p api.Peer) string {
	if p.Self {
		return "-" // a node does not check itself
	}
	r := fmt.Sprintf("%.0f", p.Reputation)
	if p.Distrusted {
		r += " (distrusted)"
	}
	return r
}
