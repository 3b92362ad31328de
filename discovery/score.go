package discovery

import (
	"net"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Peer scoring is what gives a validator Reject its teeth: each rejected
// announcement counts against the peer that sent it (P4, squared), so a
// peer that keeps sending garbage first stops receiving gossip from us,
// then has its publishes refused, then is graylisted (all its RPCs
// dropped). The counts decay, so a peer that was briefly wrong (a bad
// clock, say) recovers. Ignore (stale seq) costs nothing.
const (
	gossipThreshold    = -10
	publishThreshold   = -50
	graylistThreshold  = -80
	invalidMsgWeight   = -10              // 1 reject: -10, 2: -40, 3: -90
	invalidMsgDecay    = 10 * time.Minute // time for a count to fade to 1 %
	behaviourWeight    = -1               // broken IWANT promises, GRAFT flooding
	behaviourThreshold = 6                // penalty-free allowance
	behaviourDecay     = 10 * time.Minute //
	scoreRetain        = 10 * time.Minute // keep a departed peer's score
)

// ipColocationWeight scales the P6 penalty: 1 per squared peer beyond the
// threshold, so 4 extra peers from one IP stop getting our gossip, 7 can
// no longer publish to us and 9 are graylisted.
const ipColocationWeight = -1

// nonMemberScore is the application score of a peer of a closed swarm
// that has not shown a certificate: below the publish threshold (it gets
// none of our messages) but above the graylist, so that what it sends
// is still read: a member's subscriptions may arrive a moment before its
// certificate, and gossipsub sends them only once.
const nonMemberScore = (publishThreshold + graylistThreshold) / 2

// topicScoreParams is the scoring of one announce topic: what counts is
// the rejected messages (P4).
func topicScoreParams() *pubsub.TopicScoreParams {
	return &pubsub.TopicScoreParams{
		TopicWeight:                    1,
		TimeInMeshQuantum:              time.Second,
		InvalidMessageDeliveriesWeight: invalidMsgWeight,
		InvalidMessageDeliveriesDecay:  pubsub.ScoreParameterDecay(invalidMsgDecay),
	}
}

func scoreParams(topics []string, ipThreshold int, ipWhitelist []*net.IPNet) (*pubsub.PeerScoreParams, *pubsub.PeerScoreThresholds) {
	params := &pubsub.PeerScoreParams{
		Topics:                    map[string]*pubsub.TopicScoreParams{},
		AppSpecificScore:          func(peer.ID) float64 { return 0 },
		BehaviourPenaltyWeight:    behaviourWeight,
		BehaviourPenaltyThreshold: behaviourThreshold,
		BehaviourPenaltyDecay:     pubsub.ScoreParameterDecay(behaviourDecay),
		DecayInterval:             pubsub.DefaultDecayInterval,
		DecayToZero:               pubsub.DefaultDecayToZero,
		RetainScore:               scoreRetain,
	}
	for _, t := range topics {
		params.Topics[t] = topicScoreParams()
	}
	if ipThreshold > 0 {
		// Many keys behind one address are most likely one operator: a
		// Sybil. Gossipsub leaves loopback out (tests, one-machine labs).
		params.IPColocationFactorWeight = ipColocationWeight
		params.IPColocationFactorThreshold = ipThreshold
		params.IPColocationFactorWhitelist = ipWhitelist
	}
	thresholds := &pubsub.PeerScoreThresholds{
		GossipThreshold:   gossipThreshold,
		PublishThreshold:  publishThreshold,
		GraylistThreshold: graylistThreshold,
	}
	return params, thresholds
}
