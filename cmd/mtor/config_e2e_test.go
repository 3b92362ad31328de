package main

// End-to-end tests of running a node for months: a config file instead of
// flags, and SIGHUP reloading the backends without losing a query.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func writeFile(t *testing.T, path, body string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

// A node started with --config alone takes every setting from the file,
// TOML or YAML; a flag on the command line wins over the file.
func TestE2EConfigFile(t *testing.T) {
	needBinary(t)
	for _, tc := range []struct{ name, body string }{
		{"node.toml", `data-dir = "%s"
listen = ["/ip4/127.0.0.1/tcp/0"]
api = "127.0.0.1:0"
no-mdns = true
announce-interval = "1s"
swarm = "from-file"
backend = ["demo:model=filemodel,delay=0s"]
max-concurrency = 3
`},
		{"node.yaml", `data-dir: %s
listen:
  - /ip4/127.0.0.1/tcp/0
api: 127.0.0.1:0
no-mdns: true
announce-interval: 1s
swarm: from-file
backend: ["demo:model=filemodel,delay=0s"]
max-concurrency: 3
`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := filepath.Join(dir, tc.name)
			writeFile(t, cfg, fmt.Sprintf(tc.body, filepath.Join(dir, "data")))
			n := startNode(t, "configured", "--config", cfg)
			if got := n.value("swarm"); got != "from-file" {
				t.Fatalf("swarm = %q, want from-file", got)
			}
			if got := n.value("backend"); !strings.Contains(got, "filemodel") {
				t.Fatalf("backend line %q does not name the file's model", got)
			}
			code, out, errOut := mtor(t, "query", "--api", n.value("api"), "--model", "filemodel", "hello file")
			if code != 0 || !strings.Contains(out, "You said: hello file") {
				t.Fatalf("query: exit %d, %q, %q", code, out, errOut)
			}
			n.stop(syscall.SIGTERM)

			// The command line wins.
			m := startNode(t, "overridden", "--config", cfg, "--swarm", "from-cli", "--api", "127.0.0.1:0")
			if got := m.value("swarm"); got != "from-cli" {
				t.Fatalf("swarm = %q, want from-cli", got)
			}
		})
	}
}

// A mistake in the config file stops the node before it starts, in one
// line naming the file and the key.
func TestE2EConfigFileErrors(t *testing.T) {
	needBinary(t)
	dir := t.TempDir()
	for _, tc := range []struct{ file, body, want string }{
		{"typo.toml", "backends = [\"demo\"]\n", `typo.toml: key "backends": unknown key`},
		{"typo.yaml", "no_mdns: true\n", `typo.yaml: key "no_mdns": unknown key`},
		{"list.toml", "swarm = [\"a\", \"b\"]\n", `key "swarm": bad value: takes one value, not a list`},
		{"value.toml", "grace = 30\n", `key "grace": bad value`},
		{"syntax.toml", "swarm = \n", "syntax.toml: config file syntax"},
		{"kind.json", "{}", "unknown config file format"},
	} {
		t.Run(tc.file, func(t *testing.T) {
			p := filepath.Join(dir, tc.file)
			writeFile(t, p, tc.body)
			code, _, errOut := mtor(t, "node", "--config", p, "--data-dir", filepath.Join(dir, "d"), "--api", "off")
			if code != exitUsage || !strings.Contains(errOut, tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") != 1 {
				t.Fatalf("exit %d, stderr %q; want exit 2 and %q", code, errOut, tc.want)
			}
		})
	}
}

// SIGHUP re-reads the config file's backends: the queries streaming from
// a backend that the new file removes all finish, the backend the file
// adds is served and shows in `mtor peers`, and a broken file changes
// nothing but says why.
func TestE2EReloadOnSIGHUP(t *testing.T) {
	needBinary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "node.toml")
	base := fmt.Sprintf("data-dir = %q\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\napi = \"127.0.0.1:0\"\nno-mdns = true\nannounce-interval = \"1s\"\n", filepath.Join(dir, "data"))
	writeFile(t, cfg, base+"backend = [\"demo:model=first,delay=100ms\"]\n")
	n := startNode(t, "reloading", "--config", cfg, "--max-concurrency", "8")
	apiAddr := n.value("api")
	waitWorkers(t, apiAddr, "first", n.value("peer"))

	// Queries that stream for about 3 s each.
	const queries = 4
	prompt := strings.TrimSpace(strings.Repeat("word ", 30))
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	var started, wg sync.WaitGroup
	errs := make(chan error, queries)
	for i := range queries {
		started.Add(1)
		wg.Go(func() {
			q := exec.CommandContext(ctx, e2eBin, "query", "--api", apiAddr, "--model", "first", prompt)
			var stderr bytes.Buffer
			q.Stderr = &stderr
			out, err := q.StdoutPipe()
			if err != nil {
				started.Done()
				errs <- err
				return
			}
			if err := q.Start(); err != nil {
				started.Done()
				errs <- err
				return
			}
			first := make([]byte, 1)
			_, err = io.ReadFull(out, first)
			started.Done()
			if err != nil {
				errs <- fmt.Errorf("query %d: no output: %v; %s", i, err, stderr.String())
				return
			}
			rest, _ := io.ReadAll(out)
			if err := q.Wait(); err != nil {
				errs <- fmt.Errorf("query %d failed across the reload: %v; %s", i, err, stderr.String())
				return
			}
			if text := string(first) + string(rest); !strings.HasSuffix(text, "You said: "+prompt+"\n") {
				errs <- fmt.Errorf("query %d cut short: %q", i, text)
			}
		})
	}
	started.Wait()

	// Every query is streaming: the file now names another backend.
	writeFile(t, cfg, base+"backend = [\"demo:model=second,delay=0s\"]\n")
	if err := n.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	n.waitOutput("reload: backends from "+cfg+": 1 added, 1 removed, 0 kept", time.Minute)
	n.waitOutput("queries in flight finish on it first", 10*time.Second)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	n.waitOutput("removed; its queries in flight have finished", 30*time.Second)

	// The new backend is served and listed; the old model is gone.
	waitWorkers(t, apiAddr, "second", n.value("peer"))
	code, out, errOut := mtor(t, "peers", "--api", apiAddr)
	if code != 0 || !strings.Contains(out, "second") || strings.Contains(out, "first") {
		t.Fatalf("mtor peers after the reload: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = mtor(t, "query", "--api", apiAddr, "--model", "second", "after reload")
	if code != 0 || !strings.Contains(out, "You said: after reload") {
		t.Fatalf("query to the added backend: exit %d, %q, %q", code, out, errOut)
	}

	// A broken file: the node says so and keeps its backends.
	for _, tc := range []struct{ body, says string }{
		{base + "backend = [\n", "config file syntax"},
		{base + "backends = [\"demo:model=third\"]\n", `key "backends": unknown key`},
	} {
		writeFile(t, cfg, tc.body)
		if err := n.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		n.waitOutput("warning: reload: config "+cfg+": "+tc.says, time.Minute)
		code, out, errOut = mtor(t, "query", "--api", apiAddr, "--model", "second", "still here")
		if code != 0 || !strings.Contains(out, "You said: still here") {
			t.Fatalf("query after a failed reload: exit %d, %q, %q", code, out, errOut)
		}
	}
	if code := n.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit %d:\n%s", code, n.output())
	}
}
