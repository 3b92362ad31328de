package discovery

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
	"google.golang.org/protobuf/proto"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// The model catalogue. A node without the swarm view knows only the models
// it routes to, so a bridge of a large swarm could not list the others.
// Nodes with the swarm view therefore publish, on protocol.CatalogTopic, a
// small signed list of the models they see (name, types, features, number
// of workers), and every node that reads the topic (all but those given
// WithCatalogReader(false)) keeps the union of the recent catalogues of at
// most maxCatalogPublishers publishers.
//
// Cost independent of the swarm's size: a view node skips its periodic
// publication when, in the last catalogQuietPeriods periods, it received
// from another author a catalogue with the same models (names, types and
// features; worker counts are left out, they move all the time). The first
// view node whose timer fires publishes, the others hear it and keep
// quiet, so in a steady swarm one node publishes once a period, whatever
// the number of view nodes. The same suppression, after a short random
// delay, spaces the publications that follow a change of the model set
// (every view node sees it) and a peer joining the topic (a newcomer gets
// the catalogue within seconds rather than a period); these also wait
// until a third of a period after the last catalogue heard, so that churn
// adds at most about one catalogue per 10 s to the whole swarm.

const (
	// DefaultCatalogEvery is the catalogue period.
	DefaultCatalogEvery = 30 * time.Second
	// MinCatalogEvery and MaxCatalogEvery bound the period (WithCatalog):
	// at the longest, an entry's lifetime is protocol.MaxCatalogTTL.
	MinCatalogEvery = time.Second
	MaxCatalogEvery = protocol.MaxCatalogTTL / catalogTTLPeriods
	// catalogTTLPeriods: an entry lives this many periods after receipt,
	// so that it outlasts the longest gap between two publications of a
	// suppressed swarm (catalogQuietPeriods plus a jittered period).
	catalogTTLPeriods = 3
	// catalogQuietPeriods is how recent another author's equal catalogue
	// must be for a view node to skip its periodic publication. It is
	// more than the longest jittered period, so that the node publishing
	// keeps doing so alone.
	catalogQuietPeriods = 1.5
	catalogJitter       = 0.1
	// maxCatalogPublishers bounds the catalogues a node keeps; beyond it
	// the one received least recently goes.
	maxCatalogPublishers = 16
	// catalogBurst and one token per period/catalogRateDiv bound what one
	// author may publish (honest: one per period, plus changes and joins
	// at most every period/catalogSpacingDiv).
	catalogBurst      = 4
	catalogRateDiv    = 6
	catalogSpacingDiv = 6
	// catalogEventDiv: a publication after a change or a join waits until
	// period/catalogEventDiv (10 s) after the last catalogue heard or
	// published.
	catalogEventDiv = 3
	// catalogTickDiv: the publisher checks its model set and its timers
	// every period/catalogTickDiv (2 s by default).
	catalogTickDiv = 15
	catalogAuthors = 1024 // token buckets kept, one per author
)

// WithCatalog sets the period of the model catalogue (DefaultCatalogEvery
// unless set); zero turns it off: no catalogue is published, read or
// listed.
func WithCatalog(every time.Duration) Option {
	return func(c *config) error {
		if every < 0 || (every > 0 && every < MinCatalogEvery) || every > MaxCatalogEvery {
			return fmt.Errorf("catalog period %s out of range [%s, %s] (or 0: off)", every, MinCatalogEvery, MaxCatalogEvery)
		}
		c.catalogEvery = every
		return nil
	}
}

// WithCatalogReader says whether a node without the swarm view reads the
// catalogue (default true). A node that lists no models for anyone (a
// pure worker) saves its gossip by not reading it. A node with the swarm
// view always reads it: it publishes, and hearing the others is what keeps
// it quiet.
func WithCatalogReader(on bool) Option {
	return func(c *config) error { c.catalogRead = on; return nil }
}

// CatalogModel is a model of the swarm as catalogues tell it.
type CatalogModel struct {
	Name  string
	Types []pb.QueryType // sorted
	// Workers is the largest number of workers a publisher counted.
	Workers  int
	Features []string // sorted
}

// catalogEntry is the last catalogue of one author.
type catalogEntry struct {
	models   []*pb.CatalogModel
	byName   map[string]*pb.CatalogModel // models by name, for CatalogModel
	key      [32]byte                    // of the model set, see catalogKey
	sent     time.Time
	received time.Time
	expires  time.Time
}

// catalog is the catalogue state of one node.
type catalog struct {
	every time.Duration
	topic *pubsub.Topic
	sub   *pubsub.Subscription

	mu      sync.Mutex
	entries map[peer.ID]*catalogEntry // at most maxCatalogPublishers
	buckets *lru.Cache[peer.ID, bucket]
	heard   time.Time // last catalogue stored, of any author
}

// lastHeard is when the last catalogue of another author was stored.
func (c *catalog) lastHeard() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.heard
}

func newCatalog(every time.Duration) *catalog {
	b, err := lru.New[peer.ID, bucket](catalogAuthors)
	if err != nil {
		panic(err) // only a non-positive size fails
	}
	return &catalog{every: every, entries: map[peer.ID]*catalogEntry{}, buckets: b}
}

// startCatalog joins the catalogue topic, reads it, and with the swarm
// view publishes on it.
func (d *Discovery) startCatalog() error {
	every := d.cfg.catalogEvery
	if every <= 0 || (!d.cfg.swarmView && !d.cfg.catalogRead) {
		return nil
	}
	name := protocol.CatalogTopic(d.cfg.swarm)
	c := newCatalog(every)
	d.cat = c // before the validator, which uses it
	var err error
	if err := d.ps.RegisterTopicValidator(name, d.validateCatalog, pubsub.WithValidatorInline(true)); err != nil {
		return fmt.Errorf("register catalog validator: %w", err)
	}
	if c.topic, err = d.ps.Join(name); err != nil {
		return fmt.Errorf("join %s: %w", name, err)
	}
	if err := c.topic.SetScoreParams(topicScoreParams()); err != nil {
		return fmt.Errorf("score %s: %w", name, err)
	}
	if c.sub, err = c.topic.Subscribe(pubsub.WithBufferSize(16)); err != nil {
		return fmt.Errorf("subscribe %s: %w", name, err)
	}
	d.goRun(d.catalogReadLoop)
	if d.cfg.swarmView {
		th, err := c.topic.EventHandler()
		if err != nil {
			return fmt.Errorf("watch %s: %w", name, err)
		}
		joined := make(chan struct{}, 1)
		d.goRun(func() {
			defer th.Cancel()
			for {
				ev, err := th.NextPeerEvent(d.ctx)
				if err != nil {
					return
				}
				if ev.Type == pubsub.PeerJoin {
					select {
					case joined <- struct{}{}:
					default:
					}
				}
			}
		})
		d.goRun(func() { d.catalogPublishLoop(joined) })
	}
	return nil
}

// closeCatalog leaves the catalogue topic.
func (d *Discovery) closeCatalog() {
	c := d.cat
	if c == nil || c.topic == nil {
		return
	}
	if c.sub != nil {
		c.sub.Cancel()
	}
	if err := c.topic.Close(); err != nil {
		log.Debugw("close catalog topic", "err", err)
	}
}

// validateCatalog is the catalogue topic's validator. As for
// announcements, Reject (the forwarder penalised) is for what no honest
// peer sends, Ignore for what an honest one can cause.
func (d *Discovery) validateCatalog(_ context.Context, from peer.ID, msg *pubsub.Message) pubsub.ValidationResult {
	author := msg.GetFrom()
	if from == d.h.ID() && author == d.h.ID() {
		return pubsub.ValidationAccept // our own, built and checked by publishCatalog
	}
	if m := d.cfg.members; m != nil && (!m.IsMember(from) || m.Revoked(author)) {
		log.Debugw("catalog ignored: not from a swarm member", "author", author, "from", from)
		return pubsub.ValidationIgnore
	}
	res, c, err := d.cat.check(author, from, msg.GetData(), d.cfg.now())
	if err != nil {
		log.Debugw("catalog not accepted", "author", author, "from", from, "result", resultName(res), "err", err)
		return res
	}
	msg.ValidatorData = c
	return res
}

// check judges one catalogue of author delivered by from at now.
func (c *catalog) check(author, from peer.ID, data []byte, now time.Time) (pubsub.ValidationResult, *pb.Catalog, error) {
	if author == "" {
		return pubsub.ValidationReject, nil, fmt.Errorf("catalog without an author")
	}
	if len(data) > protocol.MaxCatalog {
		return pubsub.ValidationReject, nil, fmt.Errorf("catalog of %d bytes, limit %d", len(data), protocol.MaxCatalog)
	}
	cat := new(pb.Catalog)
	if err := proto.Unmarshal(data, cat); err != nil {
		return pubsub.ValidationReject, nil, fmt.Errorf("malformed catalog: %w", err)
	}
	sent := time.UnixMilli(cat.GetTimeUnixMs())
	// Dated too far ahead: refused without a penalty, and judged
	// otherwise as if the clocks agreed, as an announcement is
	// (announceValidator.check).
	judgeAt, ahead := aheadOf(sent, now)
	if err := protocol.ValidateCatalog(cat, judgeAt); err != nil {
		return pubsub.ValidationReject, nil, fmt.Errorf("invalid catalog: %w", err)
	}
	if ahead {
		res, err := refuseAhead(author, from, func() bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			return c.takeLocked(author, now)
		}, fmt.Errorf("catalog %w: %s ahead of this clock", errFuture, sent.Sub(now).Round(time.Millisecond)))
		return res, nil, err
	}
	ttl := time.Duration(cat.GetTtlMs()) * time.Millisecond
	if expiry := sent.Add(ttl + protocol.MaxClockSkew); expiry.Before(now) {
		return pubsub.ValidationIgnore, nil, fmt.Errorf("catalog expired %s ago", now.Sub(expiry).Round(time.Millisecond))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[author]; e != nil && !sent.After(e.sent) {
		return pubsub.ValidationIgnore, nil, fmt.Errorf("stale catalog of %s, have one of %s", sent, e.sent)
	}
	if !c.takeLocked(author, now) {
		if from == author {
			return pubsub.ValidationReject, nil, errTooFrequent
		}
		return pubsub.ValidationIgnore, nil, errTooFrequent
	}
	return pubsub.ValidationAccept, cat, nil
}

// takeLocked spends one of author's tokens. c.mu is held.
func (c *catalog) takeLocked(author peer.ID, now time.Time) bool {
	every := c.every / catalogRateDiv
	b, ok := c.buckets.Get(author)
	if !ok {
		b = bucket{tokens: catalogBurst, at: now}
	}
	if el := now.Sub(b.at); el > 0 {
		b.tokens = min(catalogBurst, b.tokens+float64(el)/float64(every))
		b.at = now
	}
	if b.tokens < 1 {
		c.buckets.Add(author, b)
		return false
	}
	b.tokens--
	c.buckets.Add(author, b)
	return true
}

// catalogReadLoop keeps the accepted catalogues.
func (d *Discovery) catalogReadLoop() {
	for {
		msg, err := d.cat.sub.Next(d.ctx)
		if err != nil {
			return
		}
		if msg.GetFrom() == d.h.ID() {
			continue // our own: what we publish is our table, not news
		}
		cat, ok := msg.ValidatorData.(*pb.Catalog)
		if !ok {
			continue
		}
		d.cat.store(msg.GetFrom(), cat, d.cfg.now())
	}
}

// store keeps cat as author's catalogue, making room if needed.
func (c *catalog) store(author peer.ID, cat *pb.Catalog, now time.Time) {
	e := &catalogEntry{
		models:   cat.GetModels(),
		byName:   make(map[string]*pb.CatalogModel, len(cat.GetModels())),
		key:      catalogKey(cat.GetModels()),
		sent:     time.UnixMilli(cat.GetTimeUnixMs()),
		received: now,
		expires:  now.Add(time.Duration(cat.GetTtlMs()) * time.Millisecond),
	}
	for _, m := range e.models {
		e.byName[m.GetName()] = m
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.entries[author]; old != nil && !e.sent.After(old.sent) {
		return // two validated out of order
	}
	if _, ok := c.entries[author]; !ok && len(c.entries) >= maxCatalogPublishers {
		var oldest peer.ID
		for p, x := range c.entries {
			if !x.expires.After(now) {
				oldest = p
				break
			}
			if oldest == "" || x.received.Before(c.entries[oldest].received) {
				oldest = p
			}
		}
		delete(c.entries, oldest)
	}
	c.entries[author] = e
	c.heard = now
}

// equalSince reports whether an author other than self sent, after since,
// a catalogue whose models have key.
func (c *catalog) equalSince(key [32]byte, since time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.entries {
		if e.key == key && e.received.After(since) {
			return true
		}
	}
	return false
}

// models is the union of the live catalogues; only name's entries when
// name is not "" (the bridge looks one model up per request: no need to
// build the others').
func (c *catalog) models(now time.Time, name string) map[string]*CatalogModel {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]*CatalogModel{}
	for p, e := range c.entries {
		if !e.expires.After(now) {
			delete(c.entries, p)
			continue
		}
		ms := e.models
		if name != "" {
			m, ok := e.byName[name]
			if !ok {
				continue
			}
			ms = []*pb.CatalogModel{m}
		}
		for _, m := range ms {
			cm := out[m.GetName()]
			if cm == nil {
				cm = &CatalogModel{Name: m.GetName()}
				out[m.GetName()] = cm
			}
			cm.Workers = max(cm.Workers, int(m.GetWorkers()))
			for _, t := range m.GetTypes() {
				if !slices.Contains(cm.Types, t) {
					cm.Types = append(cm.Types, t)
				}
			}
			for _, f := range m.GetFeatures() {
				if !slices.Contains(cm.Features, f) {
					cm.Features = append(cm.Features, f)
				}
			}
		}
	}
	for _, cm := range out {
		slices.Sort(cm.Types)
		slices.Sort(cm.Features)
	}
	return out
}

// Catalog lists, on a node without the swarm view, the models that the
// recent catalogues of the swarm's view nodes name, sorted by name. A node
// with the swarm view holds every worker already and returns nil, as does
// one with the catalogue off.
func (d *Discovery) Catalog() []CatalogModel {
	if d.cat == nil || d.cfg.swarmView {
		return nil
	}
	byName := d.cat.models(d.cfg.now(), "")
	out := make([]CatalogModel, 0, len(byName))
	for _, m := range byName {
		out = append(out, *m)
	}
	slices.SortFunc(out, func(a, b CatalogModel) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// CatalogModel is Catalog's entry of one model.
func (d *Discovery) CatalogModel(name string) (CatalogModel, bool) {
	if d.cat == nil || d.cfg.swarmView {
		return CatalogModel{}, false
	}
	if name == "" {
		return CatalogModel{}, false
	}
	m, ok := d.cat.models(d.cfg.now(), name)[name]
	if !ok {
		return CatalogModel{}, false
	}
	return *m, true
}

// catalogKey identifies a set of models by their names, types and
// features (not their worker counts), whatever their order.
func catalogKey(ms []*pb.CatalogModel) [32]byte {
	sorted := slices.Clone(ms)
	slices.SortFunc(sorted, func(a, b *pb.CatalogModel) int { return strings.Compare(a.GetName(), b.GetName()) })
	h := sha256.New()
	var n [4]byte
	put := func(s string) {
		binary.BigEndian.PutUint32(n[:], uint32(len(s)))
		h.Write(n[:])
		h.Write([]byte(s))
	}
	for _, m := range sorted {
		put(m.GetName())
		ts := slices.Clone(m.GetTypes())
		slices.Sort(ts)
		binary.BigEndian.PutUint32(n[:], uint32(len(ts)))
		h.Write(n[:])
		for _, t := range ts {
			binary.BigEndian.PutUint32(n[:], uint32(t))
			h.Write(n[:])
		}
		fs := slices.Clone(m.GetFeatures())
		slices.Sort(fs)
		binary.BigEndian.PutUint32(n[:], uint32(len(fs)))
		h.Write(n[:])
		for _, f := range fs {
			put(f)
		}
	}
	var k [32]byte
	h.Sum(k[:0])
	return k
}

// ownCatalog is the models of the workers this node holds (not draining),
// at most protocol.MaxCatalogModels, those with most workers first.
func (d *Discovery) ownCatalog() []*pb.CatalogModel {
	byName := map[string]*pb.CatalogModel{}
	for _, e := range d.table.Snapshot() {
		if e.Announce.GetDraining() {
			continue
		}
		for _, m := range e.Announce.GetModels() {
			cm := byName[m.GetName()]
			if cm == nil {
				cm = &pb.CatalogModel{Name: m.GetName()}
				byName[m.GetName()] = cm
			}
			cm.Workers = min(cm.Workers+1, protocol.MaxCatalogWorkers)
			for _, t := range m.GetTypes() {
				if !slices.Contains(cm.Types, t) {
					cm.Types = append(cm.Types, t)
				}
			}
			for _, f := range m.GetFeatures() {
				if !slices.Contains(cm.Features, f) && len(cm.Features) < protocol.MaxFeatures {
					cm.Features = append(cm.Features, f)
				}
			}
		}
	}
	out := make([]*pb.CatalogModel, 0, len(byName))
	for _, cm := range byName {
		slices.Sort(cm.Types)
		slices.Sort(cm.Features)
		out = append(out, cm)
	}
	slices.SortFunc(out, func(a, b *pb.CatalogModel) int {
		if a.Workers != b.Workers {
			return int(b.Workers) - int(a.Workers)
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out[:min(len(out), protocol.MaxCatalogModels)]
}

// catalogPublishLoop publishes this view node's catalogue: once a period
// unless another author's equal one was heard lately, and after a short
// random delay when the model set changes or a peer joins the topic (but
// not within period/catalogEventDiv of the last catalogue heard or
// published), unless another author's equal one is heard meanwhile. Our
// own publications are at least period/catalogSpacingDiv apart.
func (d *Discovery) catalogPublishLoop(joined <-chan struct{}) {
	every := d.cat.every
	jitter := func(base time.Duration, spread float64) time.Duration {
		return time.Duration(float64(base) * (1 + spread*(2*rand.Float64()-1)))
	}
	// A short random delay, so that the view nodes that all saw the same
	// change do not all publish before hearing the first of them.
	soon := func() time.Duration { return every/30 + time.Duration(rand.Int64N(int64(every/10))) }
	spacing := every / catalogSpacingDiv
	tick := time.NewTicker(every / catalogTickDiv)
	defer tick.Stop()
	var (
		lastKey  [32]byte
		lastPub  time.Time
		periodic = d.cfg.now().Add(jitter(every, catalogJitter))
		pending  bool      // a publication after a change or a join
		due      time.Time // of the pending one
		since    time.Time // the pending one is void once an equal catalogue arrives after since
	)
	// A change or a join is published no sooner than eventQuiet after the
	// last catalogue heard or published: however many view nodes see
	// changes and joins, they add at most about one catalogue per
	// eventQuiet to the swarm (every view node hears the one published).
	eventQuiet := every / catalogEventDiv
	trigger := func(now time.Time) {
		if !pending {
			start := now
			for _, last := range []time.Time{d.cat.lastHeard(), lastPub} {
				if q := last.Add(eventQuiet); !last.IsZero() && q.After(start) {
					start = q
				}
			}
			pending, due = true, start.Add(soon())
		}
		since = now
	}
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-joined:
			trigger(d.cfg.now())
			continue
		case <-tick.C:
		}
		now := d.cfg.now()
		models := d.ownCatalog()
		key := catalogKey(models)
		if key != lastKey {
			lastKey = key
			trigger(now)
		}
		publish := false
		if pending && !now.Before(due) {
			pending = false
			publish = !d.cat.equalSince(key, since)
		}
		if !now.Before(periodic) {
			periodic = now.Add(jitter(every, catalogJitter))
			quiet := time.Duration(catalogQuietPeriods * float64(every))
			// An empty set is published once, after the change that
			// emptied it (to withdraw the last one), not every period.
			publish = publish || (len(models) > 0 && !d.cat.equalSince(key, now.Add(-quiet)))
		}
		if !publish {
			continue
		}
		if !lastPub.IsZero() && now.Sub(lastPub) < spacing {
			pending, due = true, lastPub.Add(spacing)
			continue
		}
		if len(models) == 0 && lastPub.IsZero() {
			continue // nothing to tell, and nothing told before to withdraw
		}
		if err := d.publishCatalog(models, now); err != nil {
			log.Debugw("catalog not published", "err", err)
			continue
		}
		lastPub = now
	}
}

// publishCatalog publishes models, leaving out those with fewest workers
// (models is sorted so) until it fits protocol.MaxCatalog.
func (d *Discovery) publishCatalog(models []*pb.CatalogModel, now time.Time) error {
	c := &pb.Catalog{
		TimeUnixMs: now.UnixMilli(),
		TtlMs:      uint32(catalogTTLPeriods * d.cat.every / time.Millisecond),
		Models:     models,
	}
	for {
		if err := protocol.ValidateCatalog(c, now); err != nil {
			return fmt.Errorf("publish catalog: %w", err)
		}
		data, err := proto.Marshal(c)
		if err != nil {
			return fmt.Errorf("publish catalog: marshal: %w", err)
		}
		if len(data) > protocol.MaxCatalog {
			c.Models = c.Models[:len(c.Models)*9/10]
			continue
		}
		if err := d.cat.topic.Publish(d.ctx, data); err != nil {
			return fmt.Errorf("publish catalog: %w", err)
		}
		log.Debugw("catalog published", "models", len(c.Models), "bytes", len(data))
		return nil
	}
}
