// Package discovery is how mtor nodes find each other and what they know of
// each other.
//
// Joining. A node dials the peers given with --join (a multiaddr ending in
// /p2p/ID, or a join token: "mtor1" + unpadded base64url of
// {"s": swarm, "a": [multiaddr/p2p/ID, ...]}), protects them in the
// connection manager, and bootstraps the DHT from them. On a LAN, mDNS
// (service "_mtor._udp" for the default swarm, "_mtor-<8 hex of
// sha256(swarm)>._udp" for others) finds peers with no join address.
//
// DHT. A private Kademlia DHT with protocol prefix /mtor/<swarm>, values
// disabled: only provider records, one per model a worker serves, under a
// raw CID of sha256("/mtor/<swarm>/model/<name>"), so a node can find
// workers of a model that gossip has not told it about.
//
// Announcements. Workers publish a pb.Announce on the gossipsub topic
// /mtor/<swarm>/announce/1. Messages must be signed (StrictSign), which
// binds each announcement to its author's peer ID. The topic validator
// rejects (and peer scoring penalises) malformed, oversized or otherwise
// invalid announcements, and ignores (no penalty) a seq not newer than the
// last accepted from that author, one already expired, or one dated more
// than the allowed skew ahead (this node's clock may be the one behind).
// Seqs start from the clock (ms*1000) so that a restarted node is newer
// than its previous life. Own announcements are flood-published: they are
// small, and flooding does not lose those sent before the mesh forms.
//
// The peer table. One entry per announcing peer (this node included),
// holding its last announcement, when it came, when it expires (receipt +
// announced TTL) and the RTT of our pings. An entry leaves when it expires
// (swept every second) or, sooner, when the host loses its last
// connection to the peer. Subscribers get Join, Update and Leave events
// through bounded channels; a slow subscriber loses events, never blocks
// the table. The table is capped (10 000 entries by default).
package discovery
