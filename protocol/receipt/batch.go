package receipt

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// BatchDomain prefixes what a routing node signs for a batch of receipts:
// the tree's size and root (docs/protocol.md §6.4).
const BatchDomain = "mtor/receipt/v1/batch\n"

// maxProof bounds an inclusion proof: a tree of protocol.MaxReceiptBatch
// leaves is 6 levels deep.
const maxProof = 6

// One signature per batch instead of one per receipt: the routing node
// saves a signature per answer, and the worker, whose receipts come back
// together, checks one (verifiedRoots).
//
// The tree is RFC 6962's (Certificate Transparency): leaf hashes
// SHA-256(0x00 || data), inner nodes SHA-256(0x01 || left || right), a
// tree of n leaves split at the largest power of two below n. A leaf's
// data is the receipt's router signing bytes (SigningBytes(r, true)), the
// very bytes an individual countersignature covers.

// CountersignBatch countersigns rs, receipts checked by this routing node
// (Check), with one signature by key over the Merkle root of their
// leaves; each gets its RouterBatch (index, size, inclusion proof,
// signature) and loses any RouterSig. At most protocol.MaxReceiptBatch.
func CountersignBatch(rs []*pb.Receipt, key crypto.PrivKey) error {
	if len(rs) == 0 || len(rs) > protocol.MaxReceiptBatch {
		return fmt.Errorf("countersign batch: %d receipts, want 1..%d", len(rs), protocol.MaxReceiptBatch)
	}
	h := rfc6962.DefaultHasher
	leaves := make([][]byte, len(rs))
	for i, r := range rs {
		r.RouterSig, r.RouterBatch = nil, nil
		b, err := SigningBytes(r, true)
		if err != nil {
			return err
		}
		leaves[i] = h.HashLeaf(b)
	}
	proofs := make([][][]byte, len(leaves))
	root := tree(leaves, proofs)
	sig, err := sign(key, batchSigningBytes(uint32(len(rs)), root))
	if err != nil {
		return fmt.Errorf("countersign batch: %w", err)
	}
	for i, r := range rs {
		r.RouterBatch = &pb.BatchSignature{Index: uint32(i), Size: uint32(len(rs)), Proof: proofs[i], Sig: sig}
	}
	return nil
}

// tree is RFC 6962's MTH over leaf hashes (at least one); it appends to
// proofs[i] the audit path of leaf i, leaf to root, as it goes. The
// proofs share their hashes: n-1 hashes make all n proofs.
func tree(leaves [][]byte, proofs [][][]byte) []byte {
	if len(leaves) == 1 {
		return leaves[0]
	}
	k := split(len(leaves))
	l, r := tree(leaves[:k], proofs[:k]), tree(leaves[k:], proofs[k:])
	for i := range proofs[:k] {
		proofs[i] = append(proofs[i], r)
	}
	for i := range proofs[k:] {
		proofs[k+i] = append(proofs[k+i], l)
	}
	return rfc6962.DefaultHasher.HashChildren(l, r)
}

// split is the largest power of two smaller than n (n > 1).
func split(n int) int {
	k := 1
	for k*2 < n {
		k *= 2
	}
	return k
}

func batchSigningBytes(size uint32, root []byte) []byte {
	b := append([]byte(BatchDomain), binary.AppendUvarint(nil, uint64(size))...)
	return append(b, root...)
}

// verifyBatch checks r's batch countersignature: its leaf, by its proof,
// leads to a root that the requester signed for a tree of that size.
func verifyBatch(r *pb.Receipt) error {
	bs := r.GetRouterBatch()
	if bs.GetSize() == 0 || bs.GetSize() > protocol.MaxReceiptBatch || bs.GetIndex() >= bs.GetSize() || len(bs.GetProof()) > maxProof {
		return fmt.Errorf("%w: batch of %d, leaf %d, proof of %d", ErrMalformed, bs.GetSize(), bs.GetIndex(), len(bs.GetProof()))
	}
	b, err := SigningBytes(r, true)
	if err != nil {
		return err
	}
	root, err := proof.RootFromInclusionProof(rfc6962.DefaultHasher, uint64(bs.GetIndex()), uint64(bs.GetSize()), rfc6962.DefaultHasher.HashLeaf(b), bs.GetProof())
	if err != nil {
		return fmt.Errorf("%w: inclusion proof: %w", ErrMalformed, err)
	}
	msg := batchSigningBytes(bs.GetSize(), root)
	key := string(r.GetRequester()) + "\x00" + string(msg) + string(bs.GetSig())
	if verifiedRoots.has(key) {
		return nil
	}
	if err := verifyBy(r.GetRequester(), msg, bs.GetSig(), "router"); err != nil {
		return err
	}
	verifiedRoots.add(key)
	return nil
}

// maxVerifiedRoots bounds verifiedRoots: a worker gets a batch per
// routing node per half second at most.
const maxVerifiedRoots = 1024

// verifiedRoots remembers the batch signatures verified lately (signer,
// signed bytes and signature, exactly): the other receipts of the same
// batch need no second check. Only what verified is kept, so a forged
// signature is checked every time it is met, and fails every time.
var verifiedRoots = &rootCache{m: make(map[string]struct{}, maxVerifiedRoots)}

type rootCache struct {
	mu sync.Mutex
	m  map[string]struct{}
}

func (c *rootCache) has(k string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.m[k]
	return ok
}

func (c *rootCache) add(k string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= maxVerifiedRoots {
		clear(c.m) // a batch is checked within moments of its arrival
	}
	c.m[k] = struct{}{}
}
