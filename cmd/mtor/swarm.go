package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/membership"
	"github.com/mtor-swarm/mtor/protocol"
)

// defaultInviteExpiry is how long an invite's membership lasts unless
// --expires says otherwise.
const defaultInviteExpiry = 7 * 24 * time.Hour

// runSwarm manages the closed swarm of the data dir: "mtor swarm init".
func runSwarm(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "swarm", "init [--swarm NAME] [--data-dir DIR]")
	dataDir := fs.String("data-dir", defaultDataDir(e), "directory for the owner key and the swarm's config (env MTOR_DATA_DIR)")
	swarm := fs.String("swarm", protocol.DefaultSwarm, "name of the closed swarm")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || pos[0] != "init" {
		return usagef("want 'mtor swarm init'")
	}
	if *dataDir == "" {
		return usagef("--data-dir must not be empty")
	}
	if err := protocol.ValidateSwarm(*swarm); err != nil {
		return usagef("--swarm: %v", err)
	}
	o, err := membership.Init(*dataDir, *swarm)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "swarm: %s (closed)\nowner: %s\nowner key: %s\n", o.Swarm(), o.ID(), filepath.Join(*dataDir, membership.OwnerKeyFile))
	fmt.Fprintf(e.stdout, "next: start `mtor node` with this data dir, then `mtor invite` for each member\n")
	return nil
}

// runInvite prints a join token with an invite signed by the owner key.
func runInvite(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "invite", "[--peer ID] [--roles R1,R2] [--expires DURATION] [--join ADDR|TOKEN]")
	dataDir := fs.String("data-dir", defaultDataDir(e), "data dir holding the owner key (env MTOR_DATA_DIR)")
	peerID := fs.String("peer", "", "the peer ID to admit (what 'mtor id' prints on its machine); without it, an open invite that one node may redeem once")
	roles := fs.String("roles", "", "comma-separated roles the member gets (default: every role)")
	expires := fs.Duration("expires", defaultInviteExpiry, "how long the membership lasts (an open invite must be redeemed before then); 0: until revoked")
	var joins stringList
	fs.Var(&joins, "join", "address (/ip4/.../p2p/ID) or join token of a node of the swarm to put in the token, repeatable (default: the running node's, from --api); an open invite needs the owner's node")
	apiAddr := fs.String("api", defaultAPIAddr(e), "control API of the running owner node, to take its addresses from (env MTOR_API)")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	if *expires < 0 {
		return usagef("--expires must not be negative")
	}
	var roleList []string
	if *roles != "" {
		roleList = strings.Split(*roles, ",")
	}
	var member peer.ID
	if *peerID != "" {
		if member, err = peer.Decode(*peerID); err != nil {
			return usagef("--peer %q: %v", *peerID, err)
		}
	}
	var addrs []peer.AddrInfo
	for _, j := range joins {
		_, infos, err := discovery.ParseJoin(j)
		if err != nil {
			return usagef("--join: %v", err)
		}
		addrs = append(addrs, infos...)
	}
	o, err := loadOwner(*dataDir)
	if err != nil {
		return err
	}
	var inv membership.Signed
	if member != "" {
		inv, err = o.Cert(member, roleList, *expires, "")
	} else {
		inv, err = o.Invite(roleList, *expires)
	}
	if err != nil {
		return usagef("%v", err)
	}
	if len(addrs) == 0 {
		info, err := api.NewClient(*apiAddr).ID(ctx)
		if err != nil {
			return fmt.Errorf("no --join given, and the owner's node has no addresses to give: %w", explain(err, *apiAddr))
		}
		if _, addrs, err = discovery.ParseJoin(info.Join); err != nil {
			return fmt.Errorf("the running node's join token: %w", err)
		}
	}
	fmt.Fprintln(e.stdout, discovery.EncodeInviteToken(o.Swarm(), addrs, inv.Encoded))
	what := "open one-time invite " + inv.Nonce
	revoke := "--invite " + inv.Nonce
	if member != "" {
		what, revoke = "invite for peer "+member.String(), "--peer "+member.String()
	}
	until := "until revoked"
	if !inv.Expires().IsZero() {
		until = "until " + inv.Expires().UTC().Format(time.RFC3339)
	}
	fmt.Fprintf(e.stderr, "%s to swarm %s, valid %s; give the line above to --join; revoke with: mtor revoke %s\n", what, o.Swarm(), until, revoke)
	return nil
}

// runRevoke signs a revocation and hands it to the owner's node, which
// applies and gossips it within a second.
func runRevoke(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "revoke", "--peer ID | --invite NONCE|TOKEN")
	dataDir := fs.String("data-dir", defaultDataDir(e), "data dir holding the owner key (env MTOR_DATA_DIR)")
	peerID := fs.String("peer", "", "the member to revoke")
	invite := fs.String("invite", "", "the open invite to revoke (its nonce, or the join token), with the membership redeemed with it")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	if (*peerID == "") == (*invite == "") {
		return usagef("give --peer or --invite, one of them")
	}
	var p peer.ID
	if *peerID != "" {
		if p, err = peer.Decode(*peerID); err != nil {
			return usagef("--peer %q: %v", *peerID, err)
		}
	}
	nonce, err := inviteNonce(*invite)
	if err != nil {
		return usagef("--invite: %v", err)
	}
	o, err := loadOwner(*dataDir)
	if err != nil {
		return err
	}
	r, err := o.Revoke(p, nonce)
	if err != nil {
		return err
	}
	if err := membership.AppendLine(filepath.Join(*dataDir, membership.RevocationsFile), r.Encoded); err != nil {
		return err
	}
	fmt.Fprintln(e.stdout, r.Encoded)
	fmt.Fprintf(e.stderr, "revoked; the owner's node running on %s gossips it to the swarm within a second\n", *dataDir)
	return nil
}

// inviteNonce is the nonce of --invite: a nonce, or a join token whose
// invite is open.
func inviteNonce(s string) (string, error) {
	if s == "" || !strings.HasPrefix(s, discovery.TokenPrefix) {
		return s, nil
	}
	enc, err := discovery.JoinInvite(s)
	if err != nil {
		return "", err
	}
	if enc == "" {
		return "", errors.New("the join token carries no invite")
	}
	inv, err := membership.Parse(enc)
	if err != nil {
		return "", err
	}
	if inv.Kind != membership.KindInvite {
		return "", fmt.Errorf("the join token's invite is for peer %s: revoke it with --peer", inv.Peer)
	}
	return inv.Nonce, nil
}

func loadOwner(dir string) (*membership.Owner, error) {
	o, ok, err := membership.LoadOwner(dir)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("no swarm owner key in %s: run `mtor swarm init` there, or use the owner's data dir (--data-dir)", dir)
	}
	return o, nil
}

// closedSwarm builds the membership of a node: from the invite of a
// --join token, or the data dir's closed-swarm config. nil: an open swarm.
func closedSwarm(dataDir string, self peer.ID, joins []string) (*membership.Membership, error) {
	var invite string
	for _, j := range joins {
		inv, err := discovery.JoinInvite(j)
		if err != nil {
			return nil, usagef("--join: %v", err)
		}
		if inv != "" {
			invite = inv
		}
	}
	cfg, ok, err := membership.LoadConfig(dataDir)
	if err != nil {
		return nil, err
	}
	opts := []membership.Option{membership.WithStateDir(dataDir)}
	if invite != "" {
		inv, err := membership.Parse(invite)
		if err != nil {
			return nil, fmt.Errorf("--join: the token's invite: %w", err)
		}
		owner, _ := peer.Decode(inv.Owner)
		tcfg := Config{Swarm: inv.Swarm, Owner: owner}
		if ok && tcfg != cfg {
			return nil, fmt.Errorf("--join: the invite is for swarm %q of owner %s, but %s belongs to swarm %q of owner %s", tcfg.Swarm, tcfg.Owner, dataDir, cfg.Swarm, cfg.Owner)
		}
		switch inv.Kind {
		case membership.KindCert:
			if inv.PeerID() != self {
				return nil, fmt.Errorf("--join: the invite is for peer %s, and this node is %s: ask for an invite for this node (mtor invite --peer %s)", inv.Peer, self, self)
			}
			opts = append(opts, membership.WithCert(invite))
		case membership.KindInvite:
			opts = append(opts, membership.WithInvite(invite))
		default:
			return nil, fmt.Errorf("--join: the token carries a %s, not an invite", inv.Kind)
		}
		cfg, ok = tcfg, true
	}
	if !ok {
		return nil, nil
	}
	o, isOwner, err := membership.LoadOwner(dataDir)
	if err != nil {
		return nil, err
	}
	if isOwner {
		opts = append(opts, membership.WithOwner(o))
	}
	m, err := membership.New(cfg.Swarm, cfg.Owner, opts...)
	if err != nil {
		return nil, fmt.Errorf("--join: %w", err)
	}
	if invite != "" {
		// Restarts without the token stay in the swarm.
		if err := membership.SaveConfig(dataDir, cfg); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Config is membership.Config, short for the comparison above.
type Config = membership.Config
