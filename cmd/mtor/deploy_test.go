package main

// The deploy recipes in docs/deploy (a systemd unit, a container image,
// the example config file) and the config section of docs/operations.md
// must stay true to `mtor node`.

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
)

const (
	deployDir = "../../docs/deploy"
	// installedConfig is where the unit and the image read the config
	// file: docs/deploy/node.toml, installed (or copied) there.
	installedConfig = "/etc/mtor/node.toml"
)

func readDoc(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// unitExecStart is the unit's ExecStart command line.
func unitExecStart(t *testing.T) []string {
	t.Helper()
	for _, l := range strings.Split(readDoc(t, filepath.Join(deployDir, "mtor.service")), "\n") {
		if v, ok := strings.CutPrefix(l, "ExecStart="); ok {
			return strings.Fields(v)
		}
	}
	t.Fatal("mtor.service has no ExecStart")
	return nil
}

// containerCmd is the image's ENTRYPOINT and CMD, exec form.
func containerCmd(t *testing.T) (entry, cmd []string) {
	t.Helper()
	for _, l := range strings.Split(readDoc(t, filepath.Join(deployDir, "Containerfile")), "\n") {
		for prefix, dst := range map[string]*[]string{"ENTRYPOINT ": &entry, "CMD ": &cmd} {
			if v, ok := strings.CutPrefix(l, prefix); ok {
				if err := json.Unmarshal([]byte(v), dst); err != nil {
					t.Fatalf("Containerfile %s is not exec form: %v", prefix, err)
				}
			}
		}
	}
	if len(entry) == 0 || len(cmd) == 0 {
		t.Fatal("Containerfile lacks ENTRYPOINT or CMD")
	}
	return entry, cmd
}

// The unit's ExecStart and the image's command are accepted by `mtor
// node`'s flag parser, with the example config file they install.
func TestDeployCommandLinesParse(t *testing.T) {
	entry, cmd := containerCmd(t)
	for _, tc := range []struct {
		name string
		argv []string
	}{
		{"mtor.service ExecStart", unitExecStart(t)},
		{"Containerfile ENTRYPOINT+CMD", append(entry, cmd...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if len(tc.argv) < 2 || filepath.Base(tc.argv[0]) != "mtor" || tc.argv[1] != "node" {
				t.Fatalf("command %q is not `mtor node ...`", tc.argv)
			}
			args := tc.argv[2:]
			found := false
			for i, a := range args {
				if a == installedConfig {
					args[i], found = filepath.Join(deployDir, "node.toml"), true
				}
			}
			if !found {
				t.Fatalf("command %q does not read %s", tc.argv, installedConfig)
			}
			var out, errOut bytes.Buffer
			e := &env{stdout: &out, stderr: &errOut, getenv: func(string) string { return "" }}
			f, _, err := parseNodeFlags(e, args)
			if err != nil {
				t.Fatalf("mtor node %q: %v", args, err)
			}
			if f.dataDir == "" || f.apiAddr == "" {
				t.Fatalf("parsed %+v", f)
			}
		})
	}
}

// systemd itself finds nothing wrong with the unit.
func TestDeployUnitVerifies(t *testing.T) {
	needBinary(t)
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed here")
	}
	// The unit names /usr/local/bin/mtor; verify runs on a copy that
	// names the binary just built, which systemd checks is executable.
	unit := strings.ReplaceAll(readDoc(t, filepath.Join(deployDir, "mtor.service")), "/usr/local/bin/mtor", e2eBin)
	p := filepath.Join(t.TempDir(), "mtor.service")
	if err := os.WriteFile(p, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sa, "verify", p).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// fencedBlock returns the body of the fenced code block of doc that
// follows marker.
func fencedBlock(t *testing.T, doc, marker, lang string) string {
	t.Helper()
	_, rest, ok := strings.Cut(doc, marker)
	if !ok {
		t.Fatalf("no %q in the doc", marker)
	}
	_, rest, ok = strings.Cut(rest, "```"+lang+"\n")
	if !ok {
		t.Fatalf("no ```%s block after %q", lang, marker)
	}
	body, _, ok := strings.Cut(rest, "```\n")
	if !ok {
		t.Fatalf("unterminated block after %q", marker)
	}
	return body
}

// operations.md shows the whole example config file, which names every
// flag of `mtor node`; a node starts with it.
func TestOperationsExampleConfig(t *testing.T) {
	needBinary(t)
	example := fencedBlock(t, readDoc(t, "../../docs/operations.md"), "<!-- example: docs/deploy/node.toml -->", "toml")
	file := readDoc(t, filepath.Join(deployDir, "node.toml"))
	if example != file {
		t.Fatal("the config example in docs/operations.md differs from docs/deploy/node.toml")
	}
	var f nodeFlags
	fs := nodeFlagSet(&env{stdout: &bytes.Buffer{}, getenv: func(string) string { return "" }}, &f)
	fs.VisitAll(func(fl *flag.Flag) {
		if fl.Name == "config" {
			return
		}
		if !regexp.MustCompile(`(?m)^(# )?` + regexp.QuoteMeta(fl.Name) + ` = `).MatchString(file) {
			t.Errorf("the example config file does not show key %q", fl.Name)
		}
	})

	// Flags on the command line win: this node stays on loopback.
	p := filepath.Join(t.TempDir(), "node.toml")
	if err := os.WriteFile(p, []byte(example), 0o600); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, "example-config", "--config", p, "--data-dir", t.TempDir(),
		"--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0", "--no-mdns")
	if b := n.value("backend"); !strings.HasPrefix(b, "ollama http://127.0.0.1:11434") {
		t.Fatalf("backend line %q: not the example's", b)
	}
	if code := n.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit %d:\n%s", code, n.output())
	}
}

// bannerKeys are the keys of "key: value" lines ("mtor" for the version
// line), repeats folded, up to the join line; and each key's first value.
func bannerKeys(text string) ([]string, map[string]string) {
	var keys []string
	vals := map[string]string{}
	for _, l := range strings.Split(text, "\n") {
		k, v, ok := strings.Cut(l, ": ")
		if !ok {
			if f := strings.Fields(l); len(f) == 2 && f[0] == "mtor" {
				k, v = "mtor", f[1]
			} else {
				continue
			}
		}
		if len(keys) == 0 || keys[len(keys)-1] != k {
			keys = append(keys, k)
		}
		if _, seen := vals[k]; !seen {
			vals[k] = v
		}
		if k == "join" {
			break
		}
	}
	return keys, vals
}

// operations.md's sample start-up output has the real banner's lines, in
// its order, with values of the same shape.
func TestOperationsBannerMatches(t *testing.T) {
	needBinary(t)
	sample := fencedBlock(t, readDoc(t, "../../docs/operations.md"), "At start the node prints", "")
	n := startNode(t, "banner", nodeArgs(t.TempDir(), "--backend", "demo", "--bridge", "127.0.0.1:0")...)
	n.mu.Lock()
	real := n.stdout.String()
	n.mu.Unlock()
	docKeys, docVals := bannerKeys(sample)
	realKeys, realVals := bannerKeys(real)
	if strings.Join(docKeys, " ") != strings.Join(realKeys, " ") {
		t.Fatalf("the doc's banner has lines %q, the node prints %q:\n%s", docKeys, realKeys, real)
	}
	shapes := map[string]string{
		"peer": `^12D3KooW`, "swarm": `^[a-z0-9._-]+$`, "listen": `^/ip4/[0-9.]+/(tcp|udp)/\d+`, "roles": `^worker, bridge$`,
		"backend": ` up: `, "gpu": `.`, "peers": `^\d+ connected$`, "api": `^127\.0\.0\.1:\d+$`,
		"bridge": `^http://127\.0\.0\.1:\d+/$`, "join": `^mtor1`,
	}
	for k, re := range shapes {
		for who, v := range map[string]string{"doc": docVals[k], "node": realVals[k]} {
			if !regexp.MustCompile(re).MatchString(v) {
				t.Errorf("%s's %q line %q does not match %s", who, k, v, re)
			}
		}
	}
}
