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
		for {
			select {
			case <-ctx.Done():
				sub.Cancel()
				return
			case <-t.C:
				for _, r := range m.Revocations(reannounceCount) {
					m.publish(r)
				}
			}
		}
	}()
	return nil
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
