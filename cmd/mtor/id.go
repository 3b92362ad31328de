package main

import (
	"context"
	"fmt"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/node"
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
		return fmt.Errorf("identity: %w", err)
	}
	id, err := peer.IDFromPrivateKey(priv)
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	_, err = fmt.Fprintln(e.stdout, id)
	return err
}
