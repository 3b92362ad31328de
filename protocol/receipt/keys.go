package receipt

import (
	"sync"

	voi "github.com/oasisprotocol/curve25519-voi/primitives/ed25519"
)

// maxCachedKeys bounds the signer keys kept: an expanded key is about
// 1.5 KiB, so at most about 1.5 MiB. A routing node sees its workers'
// keys again and again, a worker its routers'.
const maxCachedKeys = 1024

// signerKeys caches, by binary peer ID, the Ed25519 public keys of the
// signers seen, expanded (their lookup table precomputed): verifying
// with an expanded key takes about 10-15 % less time than with the bare
// key, under the same crypto/ed25519 rules, and the signer's peer ID and
// key need no decoding. Expanding costs about a fifth of a verification,
// so a signer seen once (a ledger reloaded, peer IDs churned to thrash
// the cache) costs little more than it did without the cache.
var signerKeys = newKeyCache(maxCachedKeys)

type keyCache struct {
	mu   sync.Mutex
	max  int
	keys map[string]*voi.ExpandedPublicKey // immutable once made: used unlocked
}

func newKeyCache(max int) *keyCache {
	return &keyCache{max: max, keys: make(map[string]*voi.ExpandedPublicKey, max)}
}

// get is the key of signer (binary peer ID), nil if not cached.
func (c *keyCache) get(signer []byte) *voi.ExpandedPublicKey {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.keys[string(signer)]
}

// put expands pub, the key of signer, and caches it; nil if pub is not a
// point (crypto/ed25519 refuses every signature by it). With the cache
// full, an arbitrary key goes: a wrong choice costs one more expansion.
func (c *keyCache) put(signer []byte, pub voi.PublicKey) *voi.ExpandedPublicKey {
	exp, err := voi.NewExpandedPublicKey(pub)
	if err != nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.keys[string(signer)]; !ok && len(c.keys) >= c.max {
		for s := range c.keys {
			delete(c.keys, s)
			break
		}
	}
	c.keys[string(signer)] = exp
	return exp
}

func (c *keyCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.keys)
}

// verifyExpanded checks sig over b with exp under crypto/ed25519's rules.
func verifyExpanded(exp *voi.ExpandedPublicKey, b, sig []byte) bool {
	return voi.VerifyExpandedWithOptions(exp, b, sig, stdlibVerify)
}
