package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/ledger"
)

func runLedger(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "ledger", "[--api HOST:PORT] [--json]")
	apiAddr := fs.String("api", defaultAPIAddr(e), "control API of a running node (env MTOR_API)")
	asJSON := fs.Bool("json", false, "print the ledger as JSON, recent receipts included")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	snap, err := api.NewClient(*apiAddr).Ledger(ctx)
	if err != nil {
		return explain(err, *apiAddr)
	}
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(snap)
	}
	return printLedger(e.stdout, snap)
}

// printLedger writes one line per peer: what this node consumed from it
// (the peer worked for us) and served to it, and the balance.
func printLedger(w io.Writer, s *ledger.Snapshot) error {
	if len(s.Peers) == 0 {
		_, err := fmt.Fprintln(w, "no receipts yet: this node has neither consumed from nor served another peer")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	// CONFIRMED: served answers whose receipt came back countersigned by
	// the peer, of those served.
	fmt.Fprintln(tw, "PEER\tCONSUMED\tSERVED\tCONFIRMED\tBALANCE\tLAST")
	var confirmed uint64
	for _, p := range s.Peers {
		confirmed += p.ServedCountersigned
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.Peer, totals(p.Consumed), totals(p.Served),
			ratio(p.ServedCountersigned, p.Served.Queries), signedSeconds(p.Balance), time.UnixMilli(p.LastUnixMs).Format(time.DateTime))
	}
	fmt.Fprintf(tw, "total\t%s\t%s\t%s\t%s\t\n", totals(s.Total.Consumed), totals(s.Total.Served),
		ratio(confirmed, s.Total.Served.Queries), signedSeconds(int64(s.Total.Consumed.Ms)-int64(s.Total.Served.Ms)))
	if err := tw.Flush(); err != nil {
		return err
	}
	if s.Dropped > 0 {
		fmt.Fprintf(w, "%d peer(s) seen least recently were dropped to keep the ledger bounded\n", s.Dropped)
	}
	return nil
}

// totals is "Q q, T tok, S s, J J" for people.
func totals(t ledger.Totals) string {
	if t.Queries == 0 {
		return "-"
	}
	s := fmt.Sprintf("%dq %dtok %.2fs", t.Queries, t.PromptTokens+t.CompletionTokens, float64(t.Ms)/1000)
	if t.EnergyMJ > 0 {
		s += fmt.Sprintf(" %.1fJ", float64(t.EnergyMJ)/1000)
	}
	return s
}

func ratio(n, of uint64) string {
	if of == 0 {
		return "-"
	}
	return fmt.Sprintf("%d/%d", n, of)
}

func signedSeconds(ms int64) string { return fmt.Sprintf("%+.2fs", float64(ms)/1000) }
