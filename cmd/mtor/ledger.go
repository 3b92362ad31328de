package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/ledger"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

func runLedger(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "ledger", "[--api HOST:PORT] [--json] [--verify]")
	apiAddr := fs.String("api", defaultAPIAddr(e), "control API of a running node (env MTOR_API)")
	asJSON := fs.Bool("json", false, "print the ledger as JSON, recent receipts included")
	verify := fs.Bool("verify", false, "check the signatures of the recent receipts here, not trusting the node; exit 1 if one is bad")
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
		if err := enc.Encode(snap); err != nil {
			return err
		}
	} else if err := printLedger(e.stdout, snap); err != nil {
		return err
	}
	if !*verify {
		return nil
	}
	both, workerOnly, err := verifyRecent(snap)
	if err != nil {
		return err
	}
	// On stderr with --json, so that stdout stays one JSON document.
	out := e.stdout
	if *asJSON {
		out = e.stderr
	}
	_, err = fmt.Fprintf(out, "recent receipts: %d verified with both signatures, %d with the worker's only (not yet confirmed)\n", both, workerOnly)
	return err
}

// verifyRecent checks every recent receipt of the ledger of node
// s.Self: its signatures, and that the node is on the side the ledger
// says.
func verifyRecent(s *ledger.Snapshot) (both, workerOnly int, err error) {
	for _, rc := range s.Recent {
		var r pb.Receipt
		if err := proto.Unmarshal(rc.Receipt, &r); err != nil {
			return 0, 0, fmt.Errorf("receipt of query %s: %w", rc.QueryID, err)
		}
		side := peer.ID(r.GetRequester())
		if rc.Role == ledger.Served {
			side = peer.ID(r.GetWorker())
		}
		if side.String() != s.Self {
			return 0, 0, fmt.Errorf("receipt of query %s (%s) does not name this node %s", rc.QueryID, rc.Role, s.Self)
		}
		if !receipt.Countersigned(&r) && rc.Role == ledger.Served {
			if err := receipt.VerifyWorker(&r); err != nil {
				return 0, 0, fmt.Errorf("receipt of query %s: %w", rc.QueryID, err)
			}
			workerOnly++
			continue
		}
		if err := receipt.Verify(&r); err != nil {
			return 0, 0, fmt.Errorf("receipt of query %s: %w", rc.QueryID, err)
		}
		both++
	}
	return both, workerOnly, nil
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
