package main

import (
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// TestProfileHooks: a node started with MTOR_CPUPROFILE and
// MTOR_MEMPROFILE and stopped with SIGTERM leaves both profiles, as
// PREFIX.PID, in pprof's gzipped format.
func TestProfileHooks(t *testing.T) {
	needBinary(t)
	dir := t.TempDir()
	t.Setenv("MTOR_CPUPROFILE", filepath.Join(dir, "cpu"))
	t.Setenv("MTOR_MEMPROFILE", filepath.Join(dir, "heap"))
	n := startNode(t, "profiled", nodeArgs(filepath.Join(dir, "data"), "--backend", "demo")...)
	pid := strconv.Itoa(n.cmd.Process.Pid)
	if code := n.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit %d after SIGTERM:\n%s", code, n.output())
	}
	for _, name := range []string{"cpu", "heap"} {
		f, err := os.Open(filepath.Join(dir, name+"."+pid))
		if err != nil {
			t.Fatalf("%s profile: %v\n%s", name, err, n.output())
		}
		zr, err := gzip.NewReader(f)
		if err != nil {
			t.Fatalf("%s profile is not gzipped: %v", name, err)
		}
		b, err := io.ReadAll(zr)
		f.Close()
		if err != nil || len(b) == 0 {
			t.Fatalf("%s profile: %d bytes, %v", name, len(b), err)
		}
	}
}
