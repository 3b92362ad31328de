package main

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
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

// TestCPUProfileAfter: with MTOR_CPUPROFILE_AFTER the CPU profile starts
// late, holding what the node did after that point; a node stopped
// before leaves no file, and a value that is not a duration is refused.
func TestCPUProfileAfter(t *testing.T) {
	needBinary(t)
	for _, tc := range []struct {
		name, after string
		run         time.Duration
		want        bool
	}{
		{"started", "1s", 3 * time.Second, true},
		{"stopped before", "1h", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			t.Setenv("MTOR_CPUPROFILE", filepath.Join(dir, "cpu"))
			t.Setenv("MTOR_CPUPROFILE_AFTER", tc.after)
			n := startNode(t, "profiled", nodeArgs(filepath.Join(dir, "data"), "--backend", "demo")...)
			time.Sleep(tc.run)
			pid := strconv.Itoa(n.cmd.Process.Pid)
			if code := n.stop(syscall.SIGTERM); code != 0 {
				t.Fatalf("exit %d after SIGTERM:\n%s", code, n.output())
			}
			f, err := os.Open(filepath.Join(dir, "cpu."+pid))
			if !tc.want {
				if err == nil {
					f.Close()
					t.Fatal("a node stopped before the profile's start left a file")
				}
				return
			}
			if err != nil {
				t.Fatalf("profile: %v\n%s", err, n.output())
			}
			defer f.Close()
			zr, err := gzip.NewReader(f)
			if err != nil {
				t.Fatalf("profile is not gzipped: %v", err)
			}
			if b, err := io.ReadAll(zr); err != nil || len(b) == 0 {
				t.Fatalf("profile: %d bytes, %v", len(b), err)
			}
		})
	}
	t.Run("not a duration", func(t *testing.T) {
		t.Setenv("MTOR_CPUPROFILE", filepath.Join(t.TempDir(), "cpu"))
		t.Setenv("MTOR_CPUPROFILE_AFTER", "soon")
		cmd := exec.Command(e2eBin, append([]string{"node"}, nodeArgs(t.TempDir(), "--backend", "demo")...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(stderr.String(), "MTOR_CPUPROFILE_AFTER") {
			t.Fatalf("%v, stderr %q; want exit 2 and a message naming MTOR_CPUPROFILE_AFTER", err, stderr.String())
		}
	})
}
