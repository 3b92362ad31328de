package enginetest

import (
	"context"
	"testing"
)

// TestCloseIsGraceful: closing stdin makes the shim exit by itself (exit
// status 0), rather than being killed after the grace period.
func TestCloseIsGraceful(t *testing.T) {
	Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	e, err := Launch(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e.Close()
	if st := e.cmd.ProcessState; st == nil || !st.Success() {
		t.Fatalf("shim exit state %v, want a clean exit", st)
	}
}
