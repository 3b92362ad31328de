package discovery

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/protocol"
)

// A join token is TokenPrefix followed by the unpadded base64url encoding
// of a small JSON object: {"s": swarm, "a": [multiaddr with /p2p/ID, ...]},
// and for a closed swarm "i": the invite (node/membership: a certificate
// for one peer, or an open one-time invite).
// JSON keeps it decodable by anyone; the prefix versions the format.
const TokenPrefix = "mtor1"

// Bounds on what ParseJoin accepts, so a pasted blob cannot make us parse
// or dial without limit.
const (
	MaxTokenLen   = 4096
	MaxTokenAddrs = 32
)

type joinToken struct {
	Swarm  string   `json:"s"`
	Addrs  []string `json:"a"`
	Invite string   `json:"i,omitempty"`
}

// EncodeJoinToken returns a token holding the swarm name and the addresses
// of addrs, each with its /p2p/ID.
func EncodeJoinToken(swarm string, addrs []peer.AddrInfo) string {
	return EncodeInviteToken(swarm, addrs, "")
}

// EncodeInviteToken is EncodeJoinToken with the invite of a closed swarm.
func EncodeInviteToken(swarm string, addrs []peer.AddrInfo, invite string) string {
	tok := joinToken{Swarm: swarm, Invite: invite}
	for _, ai := range addrs {
		mas, err := peer.AddrInfoToP2pAddrs(&ai)
		if err != nil {
			continue // only an empty ID fails; nothing to join through
		}
		for _, m := range mas {
			tok.Addrs = append(tok.Addrs, m.String())
		}
	}
	b, err := json.Marshal(tok)
	if err != nil {
		panic(err) // strings only: cannot fail
	}
	return TokenPrefix + base64.RawURLEncoding.EncodeToString(b)
}

// ParseJoin reads a --join argument: either a multiaddr ending in /p2p/ID
// (swarm is then "") or a join token (swarm is the token's).
func ParseJoin(arg string) (swarm string, infos []peer.AddrInfo, err error) {
	arg = strings.TrimSpace(arg)
	switch {
	case arg == "":
		return "", nil, errors.New("empty join argument")
	case strings.HasPrefix(arg, "/"):
		ai, err := parseP2PAddr(arg)
		if err != nil {
			return "", nil, err
		}
		return "", []peer.AddrInfo{*ai}, nil
	case strings.HasPrefix(arg, TokenPrefix):
		return parseToken(arg)
	}
	return "", nil, fmt.Errorf("join argument is neither a multiaddr (/ip4/.../p2p/ID) nor a join token (%s...)", TokenPrefix)
}

func parseP2PAddr(s string) (*peer.AddrInfo, error) {
	m, err := ma.NewMultiaddr(s)
	if err != nil {
		return nil, fmt.Errorf("join address %q: %w", s, err)
	}
	ai, err := peer.AddrInfoFromP2pAddr(m)
	if err != nil {
		return nil, fmt.Errorf("join address %q needs a /p2p/<peer ID> part: %w", s, err)
	}
	if len(ai.Addrs) == 0 {
		return nil, fmt.Errorf("join address %q has a peer ID but no transport address", s)
	}
	return ai, nil
}

// JoinInvite is the invite a --join argument carries ("" for none: a
// multiaddr, or a token of an open swarm).
func JoinInvite(arg string) (string, error) {
	arg = strings.TrimSpace(arg)
	if !strings.HasPrefix(arg, TokenPrefix) {
		return "", nil
	}
	tok, err := decodeToken(arg)
	if err != nil {
		return "", err
	}
	return tok.Invite, nil
}

func decodeToken(arg string) (joinToken, error) {
	var tok joinToken
	if len(arg) > MaxTokenLen {
		return tok, fmt.Errorf("join token of %d bytes, limit %d", len(arg), MaxTokenLen)
	}
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(arg, TokenPrefix))
	if err != nil {
		return tok, fmt.Errorf("join token is not valid base64url (copy the whole join: line a node printed, or what 'mtor join-token' prints): %w", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&tok); err != nil {
		return tok, fmt.Errorf("join token is malformed (copy the whole join: line a node printed, or what 'mtor join-token' prints): %w", err)
	}
	return tok, nil
}

func parseToken(arg string) (string, []peer.AddrInfo, error) {
	tok, err := decodeToken(arg)
	if err != nil {
		return "", nil, err
	}
	if tok.Swarm == "" {
		tok.Swarm = protocol.DefaultSwarm
	}
	if err := protocol.ValidateSwarm(tok.Swarm); err != nil {
		return "", nil, fmt.Errorf("join token: %w", err)
	}
	if len(tok.Addrs) == 0 {
		return "", nil, errors.New("join token holds no addresses")
	}
	if len(tok.Addrs) > MaxTokenAddrs {
		return "", nil, fmt.Errorf("join token holds %d addresses, limit %d", len(tok.Addrs), MaxTokenAddrs)
	}
	// Merge addresses of the same peer into one AddrInfo, in token order.
	var infos []peer.AddrInfo
	index := make(map[peer.ID]int)
	for _, s := range tok.Addrs {
		ai, err := parseP2PAddr(s)
		if err != nil {
			return "", nil, fmt.Errorf("join token: %w", err)
		}
		if i, ok := index[ai.ID]; ok {
			infos[i].Addrs = append(infos[i].Addrs, ai.Addrs...)
			continue
		}
		index[ai.ID] = len(infos)
		infos = append(infos, *ai)
	}
	return tok.Swarm, infos, nil
}
