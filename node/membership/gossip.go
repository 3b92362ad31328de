package membership

import (
	"context"
	"fmt"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Revocations spread on their own gossipsub topic, one encoded
// revocation per message; every node re-announces the newest few now and
// then, and the handshake's Reply carries them to every new peer.
const (
	reannounceEvery = time.Minute
	reannounceCount = 16
	subBuffer       = 64
)

// Topic is the revocation topic of a swarm.
func Topic(swarm string) string { return "/mtor/" + swarm + "/members/1" }

type gossip struct {
	topic *pubsub.Topic
}

// StartGossip joins the revocation topic on ps: revocations received are
// applied (and forwarded) when new, and this node's are published. It
// stops when ctx ends.
func (m *Membership) StartGossip(ctx context.Context, ps *pubsub.PubSub) error {
	name := Topic(m.v.Swarm)
	if err := ps.RegisterTopicValidator(name, m.validate, pubsub.WithValidatorInline(true)); err != nil {
		return fmt.Errorf("register revocation validator: %w", err)
	}
	t, err := ps.Join(name)
	if err != nil {
		return fmt.Errorf("join %s: %w", name, err)
	}
	sub, err := t.Subscribe(pubsub.WithBufferSize(subBuffer))
	if err != nil {
		return fmt.Errorf("subscribe %s: %w", name, err)
	}
	m.mu.Lock()
	m.gossip = &gossip{topic: t}
	m.mu.Unlock()
	go func() {
		// The validator has applied them; the subscription only has to
		// be read.
		for {
			if _, err := sub.Next(ctx); err != nil {
				return
			}
		}
	}()
	go func() {
		t := time.NewTicker(reannounceEvery)
		defer t.Stop()
		cursor := 0
		for {
			select {
			case <-ctx.Done():
				sub.Cancel()
				return
			case <-t.C:
				var batch []string
				batch, cursor = m.reannounceBatch(cursor)
				for _, r := range batch {
					m.publish(r)
				}
			}
		}
	}()
	return nil
}

// reannounceBatch is what one re-announcement sends: the newest
// reannounceCount revocations, and as many older ones in turn from cursor
// (returned moved on). A node that was away when an older one came, or
// joined since (the handshake gives the newest few only), so hears every
// revocation within one turn of the list (4096 at most: 256 periods from
// one node, sooner with several), not only the newest: else a peer revoked
// before enough others would get back in there.
func (m *Membership) reannounceBatch(cursor int) ([]string, int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := len(m.revOrder)
	newest := max(0, n-reannounceCount)
	out := make([]string, 0, 2*reannounceCount)
	for _, r := range m.revOrder[newest:] {
		out = append(out, r.Encoded)
	}
	for i := 0; i < min(reannounceCount, newest); i++ {
		out = append(out, m.revOrder[(cursor+i)%newest].Encoded)
	}
	if newest > 0 {
		cursor = (cursor + reannounceCount) % newest
	}
	return out, cursor
}

// validate applies a revocation from the topic: a new valid one is
// accepted (and so forwarded), a known one ignored, a forged one
// rejected (its sender penalised).
func (m *Membership) validate(_ context.Context, from peer.ID, msg *pubsub.Message) pubsub.ValidationResult {
	if len(msg.GetData()) > MaxEncoded {
		return pubsub.ValidationReject
	}
	_, isNew, err := m.Revoke(string(msg.GetData()))
	switch {
	case err != nil:
		log.Debugw("revocation rejected", "from", from, "err", err)
		return pubsub.ValidationReject
	case !isNew && !m.local(from):
		// Our own publish of one we applied already goes out.
		return pubsub.ValidationIgnore
	}
	return pubsub.ValidationAccept
}

// publish gossips a revocation (before StartGossip: nothing).
func (m *Membership) publish(encoded string) {
	m.mu.Lock()
	g, ctx := m.gossip, m.ctx
	m.mu.Unlock()
	if g == nil || ctx == nil {
		return
	}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := g.topic.Publish(pctx, []byte(encoded)); err != nil {
		log.Debugw("publish revocation", "err", err)
	}
}

func (m *Membership) local(p peer.ID) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.h != nil && p == m.h.ID()
}

// Announce applies a revocation and gossips it to the swarm.
func (m *Membership) Announce(encoded string) error {
	if _, _, err := m.Revoke(encoded); err != nil {
		return err
	}
	m.publish(encoded)
	return nil
}
