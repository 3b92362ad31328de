package membership

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// TestDocProtocol checks that docs/protocol.md states the handshake's
// protocol ID, topic, prefix, signing domain and bounds as the code has
// them.
func TestDocProtocol(t *testing.T) {
	raw, err := os.ReadFile("../../docs/protocol.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	for _, want := range []string{
		"`" + string(ProtocolID) + "`",
		"`" + Topic("<swarm>") + "`",
		Prefix + "<base64url(body)>.<base64url(signature)>",
		"`" + strings.TrimSuffix(SignDomain, "\x00") + "`, one zero byte",
		fmt.Sprintf("at most %d bytes", MaxEncoded),
		fmt.Sprintf("at most %d bytes", MaxMessage),
		fmt.Sprintf("up to %d of the newest revocations", MaxReplyRevocations),
		fmt.Sprintf("up to %d\nrevocations", MaxRevocations),
		fmt.Sprintf("plus %d s for clock skew", int(clockSkew.Seconds())),
	} {
		if !strings.Contains(doc, want) {
			t.Errorf("docs/protocol.md does not say %q", want)
		}
	}
}
