// Package receipt signs and verifies the receipts of answers: a worker's
// signed account of one answer (tokens, timings, energy, a hash of the
// output), countersigned by the node that routed the query. The signing
// bytes are defined in docs/protocol.md §Receipts so that a client in any
// language can check them.
package receipt

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"math"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	voi "github.com/oasisprotocol/curve25519-voi/primitives/ed25519"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Domain-separation prefixes: a worker's signature can never pass for a
// router's, nor either for a signature over anything else the key signs
// (libp2p records, gossip messages).
const (
	WorkerDomain = "mtor/receipt/v1/worker\n"
	RouterDomain = "mtor/receipt/v1/router\n"
)

// Bounds on a receipt's fields, checked before any signature is.
const (
	maxPeerID = 128  // binary peer ID; an RSA key's is 39 bytes (hashed), Ed25519 38
	maxSig    = 1024 // an RSA-4096 signature is 512 bytes
)

// Typed failures of Verify; errors wrap one of them.
var (
	ErrMalformed   = errors.New("malformed receipt")
	ErrMismatch    = errors.New("receipt does not match the answer")
	ErrBadSig      = errors.New("bad receipt signature")
	ErrOutputHash  = errors.New("receipt output hash does not match the output")
	ErrNoRouterSig = errors.New("receipt not countersigned")
	// ErrImplausible is a receipt whose figures what the routing node saw
	// of the answer rules out: more time than the answer took, more tokens
	// than its output could hold, more energy than any worker draws.
	ErrImplausible = errors.New("receipt figures are implausible")
)

// Bounds of Check on a receipt's figures against what was observed.
const (
	// MaxPowerW bounds a worker's draw: energy_mj per total_ms (1 W is
	// 1 mJ/ms), over at least energyFloorMs. Eight of today's largest GPUs
	// stay well below it.
	MaxPowerW = 20000
	// energyFloorMs covers energy meters that move in steps (NVML's, tens
	// of milliseconds) on answers shorter than a step.
	energyFloorMs = 1000
	// msSlack is how far a worker's own clock may run ahead of the
	// routing node's over one answer.
	msSlack = 1000
	// tokenSlack covers tokens with no bytes of their own (special
	// tokens, a chat template's) beyond one a byte.
	tokenSlack = 64
	// MaxTokensPerMs bounds the tokens a worker may have made without
	// sending them (a reasoning model's hidden thinking), 10 000 a
	// second: several times the fastest engines' speed on one stream.
	MaxTokensPerMs = 10
	// promptSlack covers a chat template and the tokens of images.
	promptSlack = 1 << 16
)

// Observed is what the routing node saw of an answer, which bounds the
// figures its worker may claim: a worker signs what it likes, and the
// countersignature must not certify what cannot be.
type Observed struct {
	Ms           uint32 // from the request sent to the Done received
	OutputBytes  uint64 // text, tool calls, media bytes and vectors received
	Outputs      uint64 // output events received
	RequestBytes uint64 // the request's encoded size
}

// Plausible reports whether the figures of d, an answer's Done, fit what
// was observed of the answer: a routing node checks them whether or not
// a receipt came with them, since they reach its client either way.
func Plausible(d *pb.Done, o *Observed) error {
	u, tm := d.GetUsage(), d.GetTiming()
	switch {
	case uint64(tm.GetTotalMs()) > uint64(o.Ms)+msSlack:
		return fmt.Errorf("%w: %d ms claimed, the answer took %d ms", ErrImplausible, tm.GetTotalMs(), o.Ms)
	case tm.GetTtftMs() > tm.GetTotalMs():
		return fmt.Errorf("%w: first output after %d ms of %d", ErrImplausible, tm.GetTtftMs(), tm.GetTotalMs())
	case uint64(u.GetCompletionTokens()) > o.OutputBytes+o.Outputs+tokenSlack+uint64(o.Ms)*MaxTokensPerMs:
		return fmt.Errorf("%w: %d completion tokens in %d bytes of output and %d ms", ErrImplausible, u.GetCompletionTokens(), o.OutputBytes, o.Ms)
	case uint64(u.GetPromptTokens()) > o.RequestBytes+promptSlack:
		return fmt.Errorf("%w: %d prompt tokens in a request of %d bytes", ErrImplausible, u.GetPromptTokens(), o.RequestBytes)
	case d.GetEnergyMj() > (uint64(tm.GetTotalMs())+energyFloorMs)*MaxPowerW:
		return fmt.Errorf("%w: %d mJ in %d ms", ErrImplausible, d.GetEnergyMj(), tm.GetTotalMs())
	}
	return nil
}

// canonical is the receipt with only its known fields, signatures cleared
// as the role requires, deterministically encoded.
func canonical(r *pb.Receipt, keepWorkerSig bool) ([]byte, error) {
	c := &pb.Receipt{
		QueryId:          r.GetQueryId(),
		Model:            r.GetModel(),
		Type:             r.GetType(),
		PromptTokens:     r.GetPromptTokens(),
		CompletionTokens: r.GetCompletionTokens(),
		TtftMs:           r.GetTtftMs(),
		TotalMs:          r.GetTotalMs(),
		EnergyMj:         r.GetEnergyMj(),
		OutputSha256:     r.GetOutputSha256(),
		Worker:           r.GetWorker(),
		Requester:        r.GetRequester(),
		TimeUnixMs:       r.GetTimeUnixMs(),
	}
	if keepWorkerSig {
		c.WorkerSig = r.GetWorkerSig()
	}
	return proto.MarshalOptions{Deterministic: true}.Marshal(c)
}

// SigningBytes is what the worker (router false) or the routing node
// (router true) signs: the role's domain prefix, then the canonical
// encoding.
func SigningBytes(r *pb.Receipt, router bool) ([]byte, error) {
	body, err := canonical(r, router)
	if err != nil {
		return nil, fmt.Errorf("encode receipt: %w", err)
	}
	prefix := WorkerDomain
	if router {
		prefix = RouterDomain
	}
	return append([]byte(prefix), body...), nil
}

// New is the unsigned receipt of an answer described by done.
func New(req *pb.QueryRequest, done *pb.Done, output []byte, worker, requester peer.ID, now time.Time) *pb.Receipt {
	return &pb.Receipt{
		QueryId:          req.GetId(),
		Model:            done.GetModel(),
		Type:             req.GetType(),
		PromptTokens:     done.GetUsage().GetPromptTokens(),
		CompletionTokens: done.GetUsage().GetCompletionTokens(),
		TtftMs:           done.GetTiming().GetTtftMs(),
		TotalMs:          done.GetTiming().GetTotalMs(),
		EnergyMj:         done.GetEnergyMj(),
		OutputSha256:     output,
		Worker:           []byte(worker),
		Requester:        []byte(requester),
		TimeUnixMs:       now.UnixMilli(),
	}
}

// Sign adds the worker's signature with key.
func Sign(r *pb.Receipt, key crypto.PrivKey) error {
	r.WorkerSig, r.RouterSig, r.RouterBatch = nil, nil, nil
	b, err := SigningBytes(r, false)
	if err != nil {
		return err
	}
	if r.WorkerSig, err = sign(key, b); err != nil {
		return fmt.Errorf("sign receipt: %w", err)
	}
	return nil
}

// Countersign adds the routing node's signature with key; call it only
// after Check passed.
func Countersign(r *pb.Receipt, key crypto.PrivKey) error {
	r.RouterSig, r.RouterBatch = nil, nil
	b, err := SigningBytes(r, true)
	if err != nil {
		return err
	}
	if r.RouterSig, err = sign(key, b); err != nil {
		return fmt.Errorf("countersign receipt: %w", err)
	}
	return nil
}

// Expect is what the routing node knows of an answer independently of the
// worker's receipt.
type Expect struct {
	Request   *pb.QueryRequest
	Done      *pb.Done
	Output    []byte // the output hash computed from the events received
	Worker    peer.ID
	Requester peer.ID
	// SignedHere: the worker is this process (a node's own worker, called
	// without a network hop), which signed the receipt with the key this
	// process holds; its signature is not verified again.
	SignedHere bool
}

// Check verifies a receipt as the routing node does before countersigning:
// well-formed, about this query, this worker and this requester, the
// figures of done, the output received, and the worker's signature.
func Check(r *pb.Receipt, e Expect) error {
	if err := wellFormed(r); err != nil {
		return err
	}
	switch {
	case Countersigned(r):
		// Empty as the worker sends it: a countersignature the worker
		// made up would pass for the routing node's.
		return fmt.Errorf("%w: countersigned by the worker", ErrMalformed)

	case !bytes.Equal(r.GetQueryId(), e.Request.GetId()):
		return fmt.Errorf("%w: query id", ErrMismatch)
	case r.GetType() != e.Request.GetType():
		return fmt.Errorf("%w: query type", ErrMismatch)
	case r.GetModel() != e.Done.GetModel(), r.GetModel() != e.Request.GetModel():
		return fmt.Errorf("%w: model", ErrMismatch)
	case peer.ID(r.GetWorker()) != e.Worker:
		return fmt.Errorf("%w: worker", ErrMismatch)
	case peer.ID(r.GetRequester()) != e.Requester:
		return fmt.Errorf("%w: requester", ErrMismatch)
	case r.GetPromptTokens() != e.Done.GetUsage().GetPromptTokens(),
		r.GetCompletionTokens() != e.Done.GetUsage().GetCompletionTokens(),
		r.GetTtftMs() != e.Done.GetTiming().GetTtftMs(),
		r.GetTotalMs() != e.Done.GetTiming().GetTotalMs(),
		r.GetEnergyMj() != e.Done.GetEnergyMj():
		return fmt.Errorf("%w: usage, timing or energy differ from Done", ErrMismatch)
	}
	if !e.SignedHere {
		if err := verifySig(r, false); err != nil {
			return err
		}
	}
	if !bytes.Equal(r.GetOutputSha256(), e.Output) {
		return ErrOutputHash
	}
	return nil
}

// Verify checks both signatures of a countersigned receipt, as anyone
// holding it can (a ledger reloaded from disk, an auditor): the worker's
// with the key of r.worker, the router's (alone, or of its batch) with
// the key of r.requester.
func Verify(r *pb.Receipt) error {
	if err := wellFormed(r); err != nil {
		return err
	}
	if !Countersigned(r) {
		return ErrNoRouterSig
	}
	if err := verifySig(r, false); err != nil {
		return err
	}
	return verifyRouter(r)
}

// Countersigned reports whether r carries a countersignature, alone or
// of a batch; Verify says whether it holds.
func Countersigned(r *pb.Receipt) bool {
	return len(r.GetRouterSig()) > 0 || r.GetRouterBatch() != nil
}

func verifyRouter(r *pb.Receipt) error {
	if r.GetRouterBatch() != nil {
		return verifyBatch(r)
	}
	return verifySig(r, true)
}

// VerifyRouter checks the router's countersignature alone, for a receipt
// whose worker signature the caller knows is good: a worker's own
// receipt, kept since it signed it, with the countersignature that came
// back copied in. It saves the worker a signature check per answer.
func VerifyRouter(r *pb.Receipt) error {
	if err := wellFormed(r); err != nil {
		return err
	}
	if !Countersigned(r) {
		return ErrNoRouterSig
	}
	return verifyRouter(r)
}

// VerifyWorker checks the worker's signature alone, for a receipt whose
// countersignature has not come (a worker's served receipt).
func VerifyWorker(r *pb.Receipt) error {
	if err := wellFormed(r); err != nil {
		return err
	}
	return verifySig(r, false)
}

func wellFormed(r *pb.Receipt) error {
	switch {
	case r == nil:
		return fmt.Errorf("%w: none", ErrMalformed)
	case len(r.GetQueryId()) != protocol.IDLen:
		return fmt.Errorf("%w: query id of %d bytes", ErrMalformed, len(r.GetQueryId()))
	case len(r.GetOutputSha256()) != sha256.Size:
		return fmt.Errorf("%w: output hash of %d bytes", ErrMalformed, len(r.GetOutputSha256()))
	case len(r.GetWorker()) == 0 || len(r.GetWorker()) > maxPeerID,
		len(r.GetRequester()) == 0 || len(r.GetRequester()) > maxPeerID:
		return fmt.Errorf("%w: peer id size", ErrMalformed)
	case len(r.GetWorkerSig()) == 0 || len(r.GetWorkerSig()) > maxSig || len(r.GetRouterSig()) > maxSig:
		return fmt.Errorf("%w: signature size", ErrMalformed)
	case len(r.GetRouterSig()) > 0 && r.GetRouterBatch() != nil:
		return fmt.Errorf("%w: countersigned alone and in a batch", ErrMalformed)
	case len(r.GetRouterBatch().GetSig()) > maxSig:
		return fmt.Errorf("%w: batch signature size", ErrMalformed)
	case len(r.GetRouterBatch().GetProof()) > maxProof:
		return fmt.Errorf("%w: inclusion proof of %d hashes", ErrMalformed, len(r.GetRouterBatch().GetProof()))
	}
	for _, h := range r.GetRouterBatch().GetProof() {
		if len(h) != sha256.Size {
			return fmt.Errorf("%w: a proof hash of %d bytes", ErrMalformed, len(h))
		}
	}
	if err := protocol.ValidateModelName(r.GetModel()); err != nil {
		return fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	return nil
}

// verifySig checks the worker's (router false) or the router's signature
// with the public key inlined in the signer's peer ID (Ed25519, secp256k1
// and ECDSA keys are; RSA keys are not, and RSA signers are refused).
// Ed25519 keys are cached by peer ID, expanded (keys.go): the same
// signer's next receipts skip decoding the peer ID and key and verify
// faster, under the same rules.
func verifySig(r *pb.Receipt, router bool) error {
	signer, sig, who := r.GetWorker(), r.GetWorkerSig(), "worker"
	if router {
		signer, sig, who = r.GetRequester(), r.GetRouterSig(), "router"
	}
	b, err := SigningBytes(r, router)
	if err != nil {
		return err
	}
	return verifyBy(signer, b, sig, who)
}

// verifyBy checks sig over b by signer (a binary peer ID), who the
// signer is to the receipt.
func verifyBy(signer, b, sig []byte, who string) error {
	var ok bool
	if exp := signerKeys.get(signer); exp != nil {
		ok = verifyExpanded(exp, b, sig)
	} else {
		id, err := peer.IDFromBytes(signer)
		if err != nil {
			return fmt.Errorf("%w: signer peer id: %w", ErrMalformed, err)
		}
		pub, err := id.ExtractPublicKey()
		if err != nil {
			return fmt.Errorf("%w: no public key in peer id %s: %w", ErrBadSig, id, err)
		}
		if raw := ed25519Raw(pub); raw == nil {
			// Not Ed25519: as libp2p does, uncached.
			if ok, err = verify(pub, b, sig); err != nil {
				ok = false
			}
		} else if exp := signerKeys.put(signer, raw); exp != nil {
			ok = verifyExpanded(exp, b, sig)
		}
		// An Ed25519 key that is not a point verifies nothing.
	}
	if !ok {
		return fmt.Errorf("%w: %s %s", ErrBadSig, who, peer.ID(signer))
	}
	return nil
}

// stdlibVerify verifies Ed25519 signatures exactly as crypto/ed25519 (and
// so libp2p's Ed25519PublicKey.Verify) does: a signature valid for one is
// valid for the other.
var stdlibVerify = &voi.Options{Verify: voi.VerifyOptionsStdLib}

// sign signs b with key. Ed25519 keys (every mtor node's) sign with
// curve25519-voi, which takes about 60 % of crypto/ed25519's time on the
// per-answer path; Ed25519 is deterministic, so the signature is the one
// key.Sign would make. Other key types sign as libp2p does.
func sign(key crypto.PrivKey, b []byte) ([]byte, error) {
	if k, ok := key.(*crypto.Ed25519PrivateKey); ok {
		raw, err := k.Raw()
		if err == nil && len(raw) == voi.PrivateKeySize {
			return voi.Sign(voi.PrivateKey(raw), b), nil
		}
	}
	return key.Sign(b)
}

// verify checks sig over b with pub: Ed25519 keys with curve25519-voi
// under crypto/ed25519's rules (about 60 % of its time), others as libp2p
// does.
func verify(pub crypto.PubKey, b, sig []byte) (bool, error) {
	if raw := ed25519Raw(pub); raw != nil {
		return voi.VerifyWithOptions(raw, b, sig, stdlibVerify), nil
	}
	return pub.Verify(b, sig)
}

// ed25519Raw is pub's 32 bytes if it is an Ed25519 key, else nil.
func ed25519Raw(pub crypto.PubKey) voi.PublicKey {
	if k, ok := pub.(*crypto.Ed25519PublicKey); ok {
		raw, err := k.Raw()
		if err == nil && len(raw) == voi.PublicKeySize {
			return voi.PublicKey(raw)
		}
	}
	return nil
}

// OutputHash hashes the output events of one answer, in stream order, as
// docs/protocol.md §Receipts defines: one record per Chunk, ToolCallDelta,
// Media and Embedding event; Accepted, Done and Error are not output.
type OutputHash struct {
	h   hash.Hash
	buf []byte // a record's bytes, reused: Add runs per token
}

// NewOutputHash starts an empty output hash.
func NewOutputHash() *OutputHash { return &OutputHash{h: sha256.New()} }

// Record tags.
const (
	tagChunk     = 1
	tagToolCall  = 2
	tagMedia     = 3
	tagEmbedding = 4
)

// Add hashes ev if it is output.
func (o *OutputHash) Add(ev *pb.Event) {
	b := o.buf[:0]
	switch k := ev.GetKind().(type) {
	case *pb.Event_Chunk:
		b = append(b, tagChunk)
		b = appendString(b, k.Chunk.GetText())
	case *pb.Event_ToolCall:
		b = append(b, tagToolCall)
		b = binary.AppendUvarint(b, uint64(k.ToolCall.GetIndex()))
		b = appendBytes(b, []byte(k.ToolCall.GetId()))
		b = appendBytes(b, []byte(k.ToolCall.GetName()))
		b = appendBytes(b, []byte(k.ToolCall.GetArguments()))
	case *pb.Event_Media:
		b = append(b, tagMedia)
		b = appendBytes(b, []byte(k.Media.GetMime()))
		o.h.Write(b)
		b = binary.AppendUvarint(b[:0], uint64(len(k.Media.GetData())))
		o.h.Write(b)
		o.h.Write(k.Media.GetData())
		return
	case *pb.Event_Embedding:
		v := k.Embedding.GetVector()
		b = append(b, tagEmbedding)
		b = binary.AppendUvarint(b, uint64(k.Embedding.GetIndex()))
		b = binary.AppendUvarint(b, uint64(len(v)))
		for _, f := range v {
			b = binary.LittleEndian.AppendUint32(b, math.Float32bits(f))
		}
	default:
		return
	}
	o.h.Write(b)
	if cap(b) <= 4<<10 {
		o.buf = b // a large record's buffer is not kept
	}
}

// Sum is the SHA-256 of the output so far.
func (o *OutputHash) Sum() []byte { return o.h.Sum(nil) }

func appendBytes(b, v []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(v)))
	return append(b, v...)
}

func appendString(b []byte, v string) []byte {
	b = binary.AppendUvarint(b, uint64(len(v)))
	return append(b, v...)
}
