package main

import (
	"context"
	"fmt"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/api"
)

func runID(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "id", "[--data-dir DIR]")
	dataDir := fs.String("data-dir", defaultDataDir(e), "directory of the identity key (env MTOR_DATA_DIR)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	if *dataDir == "" {
		return usagef("--data-dir must not be empty")
	}
	priv, err := node.LoadOrCreateIdentity(*dataDir)
	if err != nil {
		return err // it names the identity file
	}
	id, err := peer.IDFromPrivateKey(priv)
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	_, err = fmt.Fprintln(e.stdout, id)
	return err
}

// runJoinToken prints the join token of the node running behind the
// control API: the line another node passes to --join.
func runJoinToken(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "join-token", "[--api HOST:PORT]")
	apiAddr := fs.String("api", defaultAPIAddr(e), "control API of the running node (env MTOR_API)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	info, err := api.NewClient(*apiAddr).ID(ctx)
	if err != nil {
		return explain(err, *apiAddr)
	}
	_, err = fmt.Fprintln(e.stdout, info.Join)
	return err
}
