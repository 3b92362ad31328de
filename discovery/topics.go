package discovery

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/mtor-swarm/mtor/protocol"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// Per-model topics. A worker publishes each announcement on the swarm's
// announce topic and on the topic of each model it serves
// (protocol.ModelTopic). A node with the swarm view reads the swarm topic;
// one without reads only the topics of the models it routes to, joined
// lazily (Watch) and left when more than maxWatched are in use. Flood
// publish then reaches, on a model topic, exactly the connected peers that
// asked for that model.

//
// The relay topic (protocol.RelayTopic) rides on the same machinery under
// the key relayTopicKey: relays publish on it, and a node without the swarm
// view that needs a relay reads it (WatchRelays). It is not a watched
// model: neither counted against maxWatched nor evicted.

// relayTopicKey is the relay topic's key among the model topics: a
// control character, which no model name may hold, so no model collides.
const relayTopicKey = "\x00relay"

// modelTopic is one model's topic as this node uses it: to publish its
// own announcements (own), to read other workers' (sub), or both.
type modelTopic struct {
	name   string
	topic  *pubsub.Topic
	own    bool
	sub    *pubsub.Subscription
	used   time.Time // last Watch
	since  time.Time // subscribed (Watch)
	dialed time.Time // last dialProviders started
	// stopEvents cancels the handler of peers joining (set when
	// onTopicJoin is): both the topic's leave and its loop's end call it,
	// and pubsub's Cancel is not safe to call twice at once.
	stopEvents func()
	cancel     context.CancelFunc // ends the loop reading events
	// Relay topic only: a dial is running; the wait before the next.
	dialing bool
	wait    time.Duration
}

// topicSet is the model topics of one node.
type topicSet struct {
	mu     sync.Mutex
	models map[string]*modelTopic
}

// setSubLocked sets mt's subscription (nil: none), and tells the table
// which models its per-model bound counts. (Lock order: the topics' lock,
// then the table's; the table never calls back.)
func (d *Discovery) setSubLocked(key string, mt *modelTopic, sub *pubsub.Subscription) {
	mt.sub = sub
	if key != relayTopicKey {
		d.table.setWatched(key, sub != nil)
	}
}

// joinTopic registers the announce validator and score parameters of an
// announce topic and joins it.
func (d *Discovery) joinTopic(name string) (*pubsub.Topic, error) {
	// Inline: the check is cheap, and goroutine-free validation cannot be
	// throttled into dropping messages.
	if err := d.ps.RegisterTopicValidator(name, d.validate, pubsub.WithValidatorInline(true)); err != nil {
		return nil, fmt.Errorf("register announce validator on %s: %w", name, err)
	}
	t, err := d.ps.Join(name)
	if err != nil {
		_ = d.ps.UnregisterTopicValidator(name)
		return nil, fmt.Errorf("join %s: %w", name, err)
	}
	if err := t.SetScoreParams(topicScoreParams()); err != nil {
		_ = t.Close()
		_ = d.ps.UnregisterTopicValidator(name)
		return nil, fmt.Errorf("score %s: %w", name, err)
	}
	return t, nil
}

// leaveTopicLocked closes mt's topic once nothing uses it. d.topics.mu is held.
func (d *Discovery) leaveTopicLocked(model string, mt *modelTopic) {
	if mt.own || mt.sub != nil {
		return
	}
	if mt.cancel != nil {
		mt.cancel()
	}
	if mt.stopEvents != nil {
		mt.stopEvents()
	}
	if err := mt.topic.Close(); err != nil {
		log.Debugw("close model topic", "model", model, "err", err)
	}
	_ = d.ps.UnregisterTopicValidator(mt.name)
	delete(d.topics.models, model)
}

// modelTopicLocked returns model's topic, joining it if needed. d.topics.mu is held.
func (d *Discovery) modelTopicLocked(model string) (*modelTopic, error) {
	if mt := d.topics.models[model]; mt != nil {
		return mt, nil
	}
	name := protocol.ModelTopic(d.cfg.swarm, model)
	if model == relayTopicKey {
		name = protocol.RelayTopic(d.cfg.swarm)
	}
	t, err := d.joinTopic(name)
	if err != nil {
		return nil, err
	}
	mt := &modelTopic{name: name, topic: t}
	ctx, cancel := context.WithCancel(d.ctx)
	mt.cancel = cancel
	if d.cfg.onTopicJoin != nil {
		// A node that starts watching the model gets our announcement
		// at once.
		th, err := t.EventHandler()
		if err != nil {
			cancel()
			_ = t.Close()
			return nil, fmt.Errorf("watch %s: %w", name, err)
		}
		stop := sync.OnceFunc(th.Cancel)
		mt.stopEvents = stop
		// Joins count only while we publish here: the relay topic and
		// the topics of models we route to are read by every node that
		// reads them, and a refresh for each of their joins would make
		// every join cost the whole swarm an announcement.
		publishes := func() bool {
			d.topics.mu.Lock()
			defer d.topics.mu.Unlock()
			return mt.own
		}
		d.goRun(func() { d.topicJoinLoop(ctx, name, th, stop, publishes) })
	}
	d.topics.models[model] = mt
	return mt, nil
}

// publishModels publishes data (an announcement, already stamped) on the
// topic of each model of a, and on the relay topic if a has the relay
// role, and leaves the topics no longer served.
func (d *Discovery) publishModels(ctx context.Context, a *pb.Announce, data []byte) error {
	serves := map[string]bool{}
	if !a.GetDraining() {
		// A draining worker takes no new work; its last announcement
		// (draining) still goes out on the swarm topic and below.
		for _, m := range a.GetModels() {
			serves[m.GetName()] = true
		}
	}
	// A draining node still relays until it exits.
	if slices.Contains(a.GetRoles(), "relay") {
		serves[relayTopicKey] = true
	}
	var topics []*pubsub.Topic
	var errs []error
	d.topics.mu.Lock()
	for model, mt := range d.topics.models {
		if mt.own && !serves[model] {
			// Say once more on the topic that we are draining or
			// gone from it, then leave.
			topics = append(topics, mt.topic)
			mt.own = false
			defer func() {
				d.topics.mu.Lock()
				defer d.topics.mu.Unlock()
				if cur := d.topics.models[model]; cur == mt {
					d.leaveTopicLocked(model, mt)
				}
			}()
		}
	}
	for model := range serves {
		mt, err := d.modelTopicLocked(model)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		mt.own = true
		topics = append(topics, mt.topic)
	}
	d.topics.mu.Unlock()
	for _, t := range topics {
		if err := t.Publish(ctx, data); err != nil {
			errs = append(errs, fmt.Errorf("publish on %s: %w", t.String(), err))
		}
	}
	return errors.Join(errs...)
}

// Watch subscribes to model's topic, so that this node learns (up to the
// per-model bound) the workers of model and follows their load, and dials
// some of model's DHT providers so that their announcements reach it.
// Called again for a watched model (the router asks for providers when its
// table has no worker of the model left, SeekWorkers when none it keeps is
// usable), it looks them up and dials them again. A
// node with the swarm view reads every announcement already: Watch does
// nothing there. It never blocks on the network.
func (d *Discovery) Watch(model string) error {
	if d.cfg.swarmView {
		return nil
	}
	if err := protocol.ValidateModelName(model); err != nil {
		return err
	}
	d.topics.mu.Lock()
	defer d.topics.mu.Unlock()
	if d.ctx.Err() != nil {
		return d.ctx.Err()
	}
	now := time.Now()
	if mt := d.topics.models[model]; mt != nil && mt.sub != nil {
		mt.used = now
		// Watched, yet the router asks again: the workers kept have
		// left or are unusable. Dial providers again, at most every
		// redialEvery.
		if now.Sub(mt.dialed) >= d.cfg.redialEvery {
			mt.dialed = now
			d.lookUp(model)
		}
		return nil
	}
	var watched []string
	for m, mt := range d.topics.models {
		if mt.sub != nil && m != relayTopicKey {
			watched = append(watched, m)
		}
	}
	if len(watched) >= maxWatched {
		oldest := slices.MinFunc(watched, func(a, b string) int { return d.topics.models[a].used.Compare(d.topics.models[b].used) })
		mt := d.topics.models[oldest]
		mt.sub.Cancel()
		d.setSubLocked(oldest, mt, nil)
		log.Infow("stopped watching a model, the least recently used", "model", oldest, "watching", model)
		d.leaveTopicLocked(oldest, mt)
	}
	mt, err := d.subscribeLocked(model)
	if err != nil {
		return err
	}
	mt.used, mt.dialed, mt.since = now, now, now
	d.lookUp(model)
	log.Debugw("watching model", "model", model, "topic", mt.name)
	return nil
}

// subscribeLocked joins the topic of key (a model, or relayTopicKey),
// subscribes to it and starts reading it into the table.
func (d *Discovery) subscribeLocked(key string) (*modelTopic, error) {
	mt, err := d.modelTopicLocked(key)
	if err != nil {
		return nil, err
	}
	sub, err := mt.topic.Subscribe(pubsub.WithBufferSize(subBuffer))
	if err != nil {
		d.leaveTopicLocked(key, mt)
		return nil, fmt.Errorf("subscribe %s: %w", mt.name, err)
	}
	d.setSubLocked(key, mt, sub)
	d.goRun(func() { d.readLoop(sub) })
	return mt, nil
}

// SeekWorkers is the router's word that the workers of model this node
// keeps cannot serve it now: draining, failing, busy or full. The peers
// named in unusable (those the router found failing or busy) become the
// first to be replaced by a newcomer for a while (they may recover), and
// a node without the swarm view looks the model's providers up again, as
// Watch does (at most every redialEvery), so that workers beyond those
// kept announce to it and can take their place. It never blocks.
func (d *Discovery) SeekWorkers(model string, unusable []peer.ID) {
	d.table.markUnusable(unusable, d.cfg.now().Add(unusableFor))
	if err := d.Watch(model); err != nil {
		log.Debugw("seek workers", "model", model, "err", err)
	}
}

// Measured is the router's word of what it measured of worker p: its
// smoothed time to first token, in ms. Under the per-model bound (a node
// without the swarm view) a kept worker is then judged on it, not on the
// TTFT it announces, when a newcomer would take its place. A node with
// the view keeps every worker and ignores it. It never blocks.
func (d *Discovery) Measured(p peer.ID, ttftMs float64) {
	if d.cfg.limits.perModel > 0 && ttftMs > 0 {
		d.table.setMeasured(p, ttftMs)
	}
}

// Watching lists the models whose topics this node reads.
func (d *Discovery) Watching() []string {
	d.topics.mu.Lock()
	defer d.topics.mu.Unlock()
	var out []string
	for m, mt := range d.topics.models {
		if mt.sub != nil && m != relayTopicKey {
			out = append(out, m)
		}
	}
	slices.Sort(out)
	return out
}

// watchedSince is when this node started watching model; zero when it
// does not (or has the swarm view, and watches none).
func (d *Discovery) watchedSince(model string) time.Time {
	d.topics.mu.Lock()
	defer d.topics.mu.Unlock()
	if mt := d.topics.models[model]; mt != nil && mt.sub != nil {
		return mt.since
	}
	return time.Time{}
}

// lookUp starts dialProviders for model in the background.
func (d *Discovery) lookUp(model string) {
	d.lookups.Add(1)
	d.goRun(func() { d.dialProviders(model) })
}

// WatchRelays makes a node without the swarm view, which learns no relay
// otherwise, read the relay topic and dial a few of the relays that
// provide the relay key in the DHT, so that their announcements reach its
// table. Called again, it dials again, 1 s after the first dial (the DHT
// may have been empty), then at intervals doubling to relayRedialMax: the
// relay keeper calls it every second while it lacks candidates, which in
// a swarm with fewer relays than it wants is for ever. afresh (a relay was
// just lost, and may come back) starts the spacing again at 1 s. A node
// with the swarm view reads every relay's announcement already:
// WatchRelays does nothing there. It never blocks on the network.
func (d *Discovery) WatchRelays(afresh bool) error {
	if d.cfg.swarmView {
		return nil
	}
	d.topics.mu.Lock()
	defer d.topics.mu.Unlock()
	if d.ctx.Err() != nil {
		return d.ctx.Err()
	}
	now := time.Now()
	if mt := d.topics.models[relayTopicKey]; mt != nil && mt.sub != nil {
		if afresh {
			mt.wait = 0
		}
		if !mt.dialing && now.Sub(mt.dialed) >= mt.wait {
			mt.dialed, mt.dialing = now, true
			d.goRun(func() { d.dialRelays(mt) })
		}
		return nil
	}
	mt, err := d.subscribeLocked(relayTopicKey)
	if err != nil {
		return err
	}
	mt.used, mt.dialed, mt.dialing = now, now, true
	d.goRun(func() { d.dialRelays(mt) })
	log.Infow("watching relays", "topic", mt.name)
	return nil
}

// WatchingRelays reports whether this node reads the relay topic.
func (d *Discovery) WatchingRelays() bool {
	d.topics.mu.Lock()
	defer d.topics.mu.Unlock()
	mt := d.topics.models[relayTopicKey]
	return mt != nil && mt.sub != nil
}

// dialRelays connects to up to maxRelayDials relay providers and sets
// when the next dial may start.
func (d *Discovery) dialRelays(mt *modelTopic) {
	ctx, cancel := context.WithTimeout(d.ctx, providerConnectWait)
	defer cancel()
	reached := 0
	c, err := keyCID(protocol.RelayKey(d.cfg.swarm))
	if err == nil {
		var ais []peer.AddrInfo
		if ais, err = d.findProvidersOf(ctx, c, maxRelayDials, "relays"); err == nil {
			reached = d.dialAll(ctx, ais, "relay")
		}
	}
	log.Debugw("dialled relays", "reached", reached, "err", err)
	d.topics.mu.Lock()
	defer d.topics.mu.Unlock()
	mt.dialing = false
	mt.wait = min(max(2*mt.wait, relayRedialMin), relayRedialMax)
}

// dialProviders connects to some of model's DHT providers: gossipsub
// delivers a topic only between connected peers, and a worker that sees
// us join its model's topic announces to us at once.
func (d *Discovery) dialProviders(model string) {
	ctx, cancel := context.WithTimeout(d.ctx, providerConnectWait)
	defer cancel()
	limit := d.cfg.limits.perModel
	if limit <= 0 {
		limit = defaultFindLimit
	}
	// Ask past the workers kept: a look-up for more (SeekWorkers) that
	// found only them again would find nothing.
	kept := d.table.keptOf(model)
	ais, err := d.findProviders(ctx, model, limit+len(kept))
	if err != nil {
		log.Debugw("no providers found for a watched model", "model", model, "err", err)
		return
	}
	ais = slices.DeleteFunc(ais, func(ai peer.AddrInfo) bool { return kept[ai.ID] })
	d.dialAll(ctx, ais, "provider of a watched model")
}

// dialAll connects to ais, a few at a time, and returns how many are
// connected afterwards.
func (d *Discovery) dialAll(ctx context.Context, ais []peer.AddrInfo, what string) int {
	sem := make(chan struct{}, maxDialConcurrency)
	var wg sync.WaitGroup
	var reached atomic.Int32
	for _, ai := range ais {
		if d.h.Network().Connectedness(ai.ID) == network.Connected {
			reached.Add(1)
			continue
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			dctx, dcancel := context.WithTimeout(ctx, d.cfg.dialTimeout)
			defer dcancel()
			if err := d.h.Connect(dctx, ai); err != nil {
				log.Debugw(what+" unreachable", "peer", ai.ID, "err", err)
				return
			}
			reached.Add(1)
		})
	}
	wg.Wait()
	return int(reached.Load())
}

// closeTopics cancels the model topics' subscriptions and closes them.
func (d *Discovery) closeTopics() {
	d.topics.mu.Lock()
	defer d.topics.mu.Unlock()
	for model, mt := range d.topics.models {
		if mt.sub != nil {
			mt.sub.Cancel()
			d.setSubLocked(model, mt, nil)
		}
		mt.own = false
		d.leaveTopicLocked(model, mt)
	}
}

// followerValue is what a peer subscribed to one of our topics is worth
// to the connection manager, per topic: it follows our announcements (a
// router of our models), so its connection goes after those of mere DHT
// neighbours (worth 5 or less) when the connections are trimmed.
const followerValue = 20

// topicJoinLoop reports peers joining a topic until ctx ends, and tags
// the connections of the topic's peers while they are in it: the
// followers of our announcements, so only while publishes says that we
// announce on the topic.
func (d *Discovery) topicJoinLoop(ctx context.Context, topic string, th *pubsub.TopicEventHandler, stop func(), publishes func() bool) {
	tag := "mtor-follower:" + topic
	in := map[peer.ID]struct{}{}
	defer func() {
		stop()
		for p := range in {
			d.h.ConnManager().UntagPeer(p, tag)
		}
	}()
	for {
		ev, err := th.NextPeerEvent(ctx)
		if err != nil {
			return
		}
		switch ev.Type {
		case pubsub.PeerJoin:
			if !publishes() {
				continue
			}
			if len(in) < maxFollowersTagged {
				in[ev.Peer] = struct{}{}
				d.h.ConnManager().TagPeer(ev.Peer, tag, followerValue)
			}
			d.cfg.onTopicJoin(ev.Peer)
		case pubsub.PeerLeave:
			if _, ok := in[ev.Peer]; ok {
				delete(in, ev.Peer)
				d.h.ConnManager().UntagPeer(ev.Peer, tag)
			}
		}
	}
}

// maxFollowersTagged bounds the peers tagged per topic: the set is kept
// in memory, and more than the connection manager keeps is no use.
const maxFollowersTagged = 1024
