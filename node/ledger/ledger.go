// Package ledger keeps a node's local account of the work it consumed
// from and served to each peer (queries, tokens, seconds, joules), built
// only from checked receipts, bounded in memory and on disk, and persisted
// as one JSON file in the data dir.
package ledger

import (
	"bytes"
	"cmp"
	"container/list"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	logging "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/node/internal/atomicfile"
	"github.com/mtor-swarm/mtor/protocol/pb"
	"github.com/mtor-swarm/mtor/protocol/receipt"
)

var log = logging.Logger("mtor/ledger")

// FileName is the ledger's file in the data dir.
const FileName = "ledger.json"

// Defaults; docs/operations.md states the same.
const (
	DefaultMaxPeers      = 1024
	DefaultMaxRecent     = 64
	DefaultFlushInterval = 5 * time.Second
	// maxPending bounds the served receipts awaiting their
	// countersignature; the oldest is forgotten first.
	maxPending = 1024
	// maxFile bounds what Open reads: the bounds above keep a file written
	// by this package well under it.
	maxFile = 4 << 20
)

// Role says on which side of an answer this node was.
type Role string

// Roles.
const (
	Consumed Role = "consumed" // this node asked, the peer answered
	Served   Role = "served"   // the peer asked, this node answered
)

// Totals add up answers.
type Totals struct {
	Queries          uint64 `json:"queries"`
	PromptTokens     uint64 `json:"prompt_tokens"`
	CompletionTokens uint64 `json:"completion_tokens"`
	Ms               uint64 `json:"ms"`        // the workers' total_ms
	EnergyMJ         uint64 `json:"energy_mj"` // measured energy only
}

func (t *Totals) add(r *pb.Receipt) {
	t.plus(Totals{Queries: 1, PromptTokens: uint64(r.GetPromptTokens()), CompletionTokens: uint64(r.GetCompletionTokens()),
		Ms: uint64(r.GetTotalMs()), EnergyMJ: r.GetEnergyMj()})
}

// plus adds o, saturating: a figure is the worker's own (a receipt's
// energy is any uint64 it likes), and a sum that wrapped would make its
// peer's totals and the ledger's small and wrong; one stuck at the
// maximum says what happened.
func (t *Totals) plus(o Totals) {
	t.Queries = SatAdd(t.Queries, o.Queries)
	t.PromptTokens = SatAdd(t.PromptTokens, o.PromptTokens)
	t.CompletionTokens = SatAdd(t.CompletionTokens, o.CompletionTokens)
	t.Ms = SatAdd(t.Ms, o.Ms)
	t.EnergyMJ = SatAdd(t.EnergyMJ, o.EnergyMJ)
}

// SatAdd is a + b, or the largest uint64 where that would wrap: totals of
// figures that peers report, which may be absurd.
func SatAdd(a, b uint64) uint64 {
	if s := a + b; s >= a {
		return s
	}
	return math.MaxUint64
}

// Entry is the account with one peer.
type Entry struct {
	Peer     string `json:"peer"`
	Consumed Totals `json:"consumed"` // answers the peer gave this node
	Served   Totals `json:"served"`   // answers this node gave the peer
	// ServedCountersigned counts the answers served to the peer whose
	// receipt came back countersigned by it (the receipt exchange).
	ServedCountersigned uint64 `json:"served_countersigned"`
	// Balance is the peer's contribution to this node: milliseconds of
	// work it did for us minus those we did for it.
	Balance    int64 `json:"balance_ms"`
	LastUnixMs int64 `json:"last_unix_ms"`
}

// Recent is one recorded receipt, kept so that anyone can verify it.
type Recent struct {
	Role    Role   `json:"role"`
	Peer    string `json:"peer"`
	QueryID string `json:"query_id"` // hex
	Model   string `json:"model"`
	Tokens  uint32 `json:"completion_tokens"`
	Ms      uint32 `json:"ms"`
	Receipt []byte `json:"receipt"` // the Receipt protobuf (base64 in JSON)
}

// Snapshot is the whole ledger, as `mtor ledger` and GET /v1/ledger show it.
type Snapshot struct {
	Self    string   `json:"self"`
	Total   Sides    `json:"total"`
	Peers   []Entry  `json:"peers"`         // most recent first
	Recent  []Recent `json:"recent"`        // newest first
	Dropped uint64   `json:"dropped_peers"` // evicted to stay within MaxPeers
}

// Sides is consumed and served over all peers.
type Sides struct {
	Consumed Totals `json:"consumed"`
	Served   Totals `json:"served"`
}

// Ledger is safe for concurrent use.
type Ledger struct {
	path       string
	self       peer.ID
	maxPeers   int
	maxRecent  int
	flushEvery time.Duration

	mu sync.Mutex
	// peers by ID: the base58 form (Entry.Peer) is encoded once per
	// peer, not once per receipt.
	peers   map[peer.ID]*Entry
	recent  []Recent // oldest first
	dropped uint64
	dirty   bool
	// pending are served receipts whose countersignature has not come
	// back, by query id and worker signature (a query asked again of this
	// node is served twice, each answer with its receipt), each an element
	// of order (their arrival, oldest first, for eviction): taking one
	// back unlinks it, with no search.
	pending map[pendingKey]*list.Element // of order, holding its *pb.Receipt
	order   *list.List
}

// Option configures a Ledger.
type Option func(*Ledger)

// WithMaxPeers bounds the peers kept; the least recently seen goes first.
func WithMaxPeers(n int) Option {
	return func(l *Ledger) {
		if n > 0 {
			l.maxPeers = n
		}
	}
}

// WithMaxRecent bounds the receipts kept.
func WithMaxRecent(n int) Option {
	return func(l *Ledger) {
		if n >= 0 {
			l.maxRecent = n
		}
	}
}

// WithFlushInterval sets how often Run writes a changed ledger to disk.
func WithFlushInterval(d time.Duration) Option {
	return func(l *Ledger) {
		if d > 0 {
			l.flushEvery = d
		}
	}
}

// file is the on-disk form.
type file struct {
	Version int      `json:"version"`
	Peers   []Entry  `json:"peers"`
	Recent  []Recent `json:"recent"`
	Dropped uint64   `json:"dropped_peers"`
}

// ErrCorrupt wraps a ledger file that cannot be read back.
var ErrCorrupt = errors.New("ledger file corrupt")

// Open loads the ledger of node self from dir (empty dir: in memory only).
// A corrupt file is moved aside (ledger.json.bad) and the ledger starts
// empty, with a warning: losing the account must not stop the node.
func Open(dir string, self peer.ID, opts ...Option) (*Ledger, error) {
	l := &Ledger{self: self, maxPeers: DefaultMaxPeers, maxRecent: DefaultMaxRecent,
		flushEvery: DefaultFlushInterval, peers: map[peer.ID]*Entry{}, pending: map[pendingKey]*list.Element{}, order: list.New()}
	for _, o := range opts {
		o(l)
	}
	if dir == "" {
		return l, nil
	}
	l.path = filepath.Join(dir, FileName)
	err := l.load()
	if errors.Is(err, ErrCorrupt) {
		log.Warnw("ledger file unreadable; starting an empty ledger", "path", l.path, "err", err)
		if rerr := os.Rename(l.path, l.path+".bad"); rerr != nil {
			return nil, fmt.Errorf("move corrupt ledger aside: %w", rerr)
		}
		return l, nil
	}
	return l, err
}

func (l *Ledger) load() error {
	f, err := os.Open(l.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open ledger: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxFile+1))
	if err != nil {
		return fmt.Errorf("read ledger: %w", err)
	}
	if len(b) > maxFile {
		return fmt.Errorf("%w: over %d bytes", ErrCorrupt, maxFile)
	}
	var fl file
	if err := json.Unmarshal(b, &fl); err != nil {
		return fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	for _, e := range fl.Peers {
		id, err := peer.Decode(e.Peer)
		if err != nil {
			continue
		}
		e := e
		e.Peer = id.String() // canonical, as Record writes it
		l.peers[id] = &e
	}
	l.recent = fl.Recent
	l.dropped = fl.Dropped
	// A file from a node with larger bounds is cut to ours.
	for len(l.peers) > l.maxPeers {
		l.evictLocked()
	}
	if len(l.recent) > l.maxRecent {
		l.recent = l.recent[len(l.recent)-l.maxRecent:]
	}
	// Served receipts whose countersignature had not come back when the
	// last process stopped await it again: a router returns a batch to a
	// worker that restarted (receiptback keeps it a while for a worker
	// away), and the new process takes what the old one signed.
	for _, rc := range l.recent {
		var r pb.Receipt
		if rc.Role != Served || len(rc.Receipt) == 0 || proto.Unmarshal(rc.Receipt, &r) != nil || receipt.Countersigned(&r) {
			continue
		}
		l.addPendingLocked(&r)
	}
	return nil
}

// Record adds a checked receipt. The peer is the receipt's worker when
// this node consumed, its requester when this node served; a receipt
// of this node with itself is not recorded.
func (l *Ledger) Record(role Role, r *pb.Receipt) {
	p := peer.ID(r.GetWorker())
	if role == Served {
		p = peer.ID(r.GetRequester())
	}
	if p == l.self || p == "" {
		return
	}
	raw, _ := proto.Marshal(r)
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.peers[p]
	if e == nil {
		if len(l.peers) >= l.maxPeers {
			l.evictLocked()
		}
		e = &Entry{Peer: p.String()}
		l.peers[p] = e
	}
	if role == Served {
		e.Served.add(r)
	} else {
		e.Consumed.add(r)
	}
	e.Balance = int64(e.Consumed.Ms) - int64(e.Served.Ms)
	e.LastUnixMs = time.Now().UnixMilli()
	if l.maxRecent > 0 {
		if len(l.recent) >= l.maxRecent {
			l.recent = slices.Delete(l.recent, 0, len(l.recent)-l.maxRecent+1)
		}
		l.recent = append(l.recent, Recent{Role: role, Peer: e.Peer, QueryID: hex.EncodeToString(r.GetQueryId()),
			Model: r.GetModel(), Tokens: r.GetCompletionTokens(), Ms: r.GetTotalMs(), Receipt: raw})
	}
	if role == Served {
		l.addPendingLocked(r)
	}
	l.dirty = true
}

// pendingKey is a served receipt awaiting its countersignature: its
// query, and its worker signature, which tells apart two answers to one
// query (a router asks a worker again after the first fell silent on a
// lossy link, docs/architecture.md: the first's Done may never reach it).
type pendingKey struct{ id, sig string }

func keyOf(r *pb.Receipt) pendingKey {
	return pendingKey{string(r.GetQueryId()), string(r.GetWorkerSig())}
}

func (l *Ledger) addPendingLocked(r *pb.Receipt) {
	k := keyOf(r)
	if _, dup := l.pending[k]; dup {
		return
	}
	if l.order.Len() >= maxPending {
		oldest := l.order.Front()
		delete(l.pending, keyOf(l.order.Remove(oldest).(*pb.Receipt)))
	}
	l.pending[k] = l.order.PushBack(r)
}

// ErrNotPending is returned by Countersigned for a receipt this node did
// not serve, or whose countersignature already came (or came too late).
var ErrNotPending = errors.New("no served receipt awaits this countersignature")

// Pending is a copy of the served receipt of query id with worker
// signature sig that awaits its countersignature, or nil. The receipt
// exchange checks a returned receipt against it: this node signed it, so
// only the countersignature needs checking.
func (l *Ledger) Pending(id, sig []byte) *pb.Receipt {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.pending[pendingKey{string(id), string(sig)}]
	if e == nil {
		return nil
	}
	return proto.CloneOf(e.Value.(*pb.Receipt))
}

// Countersigned takes the countersigned receipt of an answer this node
// served: it must be one recorded with Record(Served, ...) (same query id,
// same worker signature) and its countersignature must already have been
// verified by the caller (receipt.Verify). The peer's
// ServedCountersigned grows by one and the recent copy is replaced.
func (l *Ledger) Countersigned(r *pb.Receipt) error {
	k := keyOf(r)
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.pending[k]
	if e == nil {
		return ErrNotPending
	}
	if mine := e.Value.(*pb.Receipt); !bytes.Equal(mine.GetRequester(), r.GetRequester()) {
		return ErrNotPending
	}
	delete(l.pending, k)
	l.order.Remove(e)
	if e := l.peers[peer.ID(r.GetRequester())]; e != nil {
		e.ServedCountersigned++
	}
	// The recent copy of this answer, not of another answer to the same
	// query (one asked again): the one with the same worker signature.
	qid := hex.EncodeToString(r.GetQueryId())
	for i := len(l.recent) - 1; i >= 0; i-- {
		if l.recent[i].Role != Served || l.recent[i].QueryID != qid {
			continue
		}
		var kept pb.Receipt
		if proto.Unmarshal(l.recent[i].Receipt, &kept) != nil || !bytes.Equal(kept.GetWorkerSig(), r.GetWorkerSig()) {
			continue
		}
		if raw, err := proto.Marshal(r); err == nil {
			l.recent[i].Receipt = raw
		}
		break
	}
	l.dirty = true
	return nil
}

// evictLocked drops the least recently seen peer.
func (l *Ledger) evictLocked() {
	var oldest *Entry
	var id peer.ID
	for p, e := range l.peers {
		if oldest == nil || e.LastUnixMs < oldest.LastUnixMs {
			oldest, id = e, p
		}
	}
	if oldest != nil {
		delete(l.peers, id)
		l.dropped++
	}
}

// Balance is p's contribution to this node in milliseconds of work (work
// it did for us minus work we did for it); 0 for a peer not in the ledger.
func (l *Ledger) Balance(p peer.ID) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e := l.peers[p]; e != nil {
		return e.Balance
	}
	return 0
}

// Snapshot copies the ledger.
func (l *Ledger) Snapshot() Snapshot {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := Snapshot{Self: l.self.String(), Dropped: l.dropped, Peers: make([]Entry, 0, len(l.peers)),
		Recent: make([]Recent, 0, len(l.recent))}
	for _, e := range l.peers {
		s.Peers = append(s.Peers, *e)
		s.Total.Consumed.plus(e.Consumed)
		s.Total.Served.plus(e.Served)
	}
	slices.SortFunc(s.Peers, func(a, b Entry) int {
		return cmp.Or(cmp.Compare(b.LastUnixMs, a.LastUnixMs), cmp.Compare(a.Peer, b.Peer))
	})
	for i := len(l.recent) - 1; i >= 0; i-- {
		s.Recent = append(s.Recent, l.recent[i])
	}
	return s
}

// Run writes the ledger to disk whenever it changed, every flush
// interval, until ctx ends.
func (l *Ledger) Run(ctx context.Context) {
	t := time.NewTicker(l.flushEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := l.Flush(); err != nil {
				log.Warnw("writing the ledger failed", "err", err)
			}
		}
	}
}

// Flush writes the ledger if it changed since the last write: to a
// temporary file, then renamed over the old one, so a crash leaves the
// old or the new ledger, never half of one.
func (l *Ledger) Flush() error {
	if l.path == "" {
		return nil
	}
	l.mu.Lock()
	if !l.dirty {
		l.mu.Unlock()
		return nil
	}
	fl := file{Version: 1, Dropped: l.dropped, Recent: slices.Clone(l.recent)}
	for _, e := range l.peers {
		fl.Peers = append(fl.Peers, *e)
	}
	l.dirty = false
	l.mu.Unlock()
	b, err := json.Marshal(fl)
	if err != nil {
		return fmt.Errorf("encode ledger: %w", err)
	}
	if err := atomicfile.Write(l.path, b, 0o600); err != nil {
		l.markDirty()
		return fmt.Errorf("ledger: %w", err)
	}
	return nil
}

func (l *Ledger) markDirty() {
	l.mu.Lock()
	l.dirty = true
	l.mu.Unlock()
}
