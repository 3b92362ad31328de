package protocol

import (
	"strings"
	"testing"
)

func TestProtocolIDs(t *testing.T) {
	tests := []struct {
		swarm                                             string
		query, topic, dht, modelKey, relayTopic, relayKey string
	}{
		{"", "/mtor/query/1.0.0", "/mtor/mtor/announce/1", "/mtor/mtor", "/mtor/mtor/model/llama3", "/mtor/mtor/announce/1/relay", "/mtor/mtor/relay"},
		{DefaultSwarm, "/mtor/query/1.0.0", "/mtor/mtor/announce/1", "/mtor/mtor", "/mtor/mtor/model/llama3", "/mtor/mtor/announce/1/relay", "/mtor/mtor/relay"},
		{"lab-7", "/mtor/lab-7/query/1.0.0", "/mtor/lab-7/announce/1", "/mtor/lab-7", "/mtor/lab-7/model/llama3", "/mtor/lab-7/announce/1/relay", "/mtor/lab-7/relay"},
	}
	for _, tc := range tests {
		if got := string(QueryProtocol(tc.swarm)); got != tc.query {
			t.Errorf("QueryProtocol(%q) = %q, want %q", tc.swarm, got, tc.query)
		}
		if got := AnnounceTopic(tc.swarm); got != tc.topic {
			t.Errorf("AnnounceTopic(%q) = %q, want %q", tc.swarm, got, tc.topic)
		}
		if got := string(DHTPrefix(tc.swarm)); got != tc.dht {
			t.Errorf("DHTPrefix(%q) = %q, want %q", tc.swarm, got, tc.dht)
		}
		if got := ModelKey(tc.swarm, "llama3"); got != tc.modelKey {
			t.Errorf("ModelKey(%q) = %q, want %q", tc.swarm, got, tc.modelKey)
		}
		if got := RelayTopic(tc.swarm); got != tc.relayTopic {
			t.Errorf("RelayTopic(%q) = %q, want %q", tc.swarm, got, tc.relayTopic)
		}
		if got := RelayKey(tc.swarm); got != tc.relayKey {
			t.Errorf("RelayKey(%q) = %q, want %q", tc.swarm, got, tc.relayKey)
		}
	}
	if !strings.HasSuffix(string(QueryProtocol("x")), "/"+Version) {
		t.Errorf("query protocol does not carry the version %s", Version)
	}
}

// TestSwarmsDoNotCollide checks that two different valid swarm names never
// share a protocol ID, topic or DHT prefix.
func TestSwarmsDoNotCollide(t *testing.T) {
	names := []string{DefaultSwarm, "query", "a", "a.b", "a-b", "a_b", "0", strings.Repeat("z", 32)}
	seen := map[string]string{}
	for _, n := range names {
		if err := ValidateSwarm(n); err != nil {
			t.Fatalf("ValidateSwarm(%q) = %v", n, err)
		}
		for _, id := range []string{string(QueryProtocol(n)), AnnounceTopic(n), string(DHTPrefix(n))} {
			if prev, ok := seen[id]; ok {
				t.Errorf("%q is used by swarms %q and %q", id, prev, n)
			}
			seen[id] = n
		}
	}
}

func TestValidateSwarm(t *testing.T) {
	for _, ok := range []string{"mtor", "a", "0lab", "lab.eu-1_x", strings.Repeat("a", 32)} {
		if err := ValidateSwarm(ok); err != nil {
			t.Errorf("ValidateSwarm(%q) = %v, want nil", ok, err)
		}
	}
	for _, bad := range []string{"", "Lab", "-lab", ".lab", "_lab", "lab/x", "lab x", "lab\n", "läb",
		strings.Repeat("a", 33), "../x", "a/../b"} {
		if err := ValidateSwarm(bad); err == nil {
			t.Errorf("ValidateSwarm(%q) = nil, want an error", bad)
		}
	}
}

// TestModelTopic checks that per-model topics are bounded, distinct per
// model and per swarm, and under the swarm's announce topic.
func TestModelTopic(t *testing.T) {
	long := strings.Repeat("m", MaxModelName)
	tests := []struct{ swarm, model, want string }{
		{"", "llama3", "/mtor/mtor/announce/1/m/"},
		{"lab-7", "llama3", "/mtor/lab-7/announce/1/m/"},
		{"lab-7", long, "/mtor/lab-7/announce/1/m/"},
	}
	seen := map[string]bool{}
	for _, tc := range tests {
		got := ModelTopic(tc.swarm, tc.model)
		if !strings.HasPrefix(got, tc.want) || len(got) != len(tc.want)+32 {
			t.Errorf("ModelTopic(%q, %q) = %q, want %q and 32 hex digits", tc.swarm, tc.model, got, tc.want)
		}
		if seen[got] {
			t.Errorf("ModelTopic(%q, %q) = %q collides", tc.swarm, tc.model, got)
		}
		seen[got] = true
	}
	if ModelTopic("", "a") == ModelTopic("", "b") {
		t.Error("two models share a topic")
	}
	if PresenceTopic("lab") != "/mtor/lab/presence/1" {
		t.Errorf("PresenceTopic(lab) = %q", PresenceTopic("lab"))
	}
}
