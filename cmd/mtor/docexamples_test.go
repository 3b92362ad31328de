package main

// The shell examples of docs/operations.md and docs/bridge-api.md run
// against a real node, as protocol/doc_test.go does for protocol.md. Each
// ```sh block is marked: `<!-- run by the tests[; expect: TEXT] -->` or
// `<!-- not run by the tests: WHY -->`; an unmarked one fails the test.

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// docExample is one ```sh block of a doc.
type docExample struct {
	doc, line string // where, for messages
	script    string
	run       bool
	expect    string // in the output, when set
	why       string // why it is not run
}

func docExamples(t *testing.T, path string) []docExample {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []docExample
	var marker string
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "<!-- run by the tests") || strings.HasPrefix(line, "<!-- not run by the tests"):
			marker = line
		case line == "```sh":
			ex := docExample{doc: filepath.Base(path), line: filepath.Base(path) + ":" + strconv.Itoa(n)}
			var body []string
			for sc.Scan() {
				n++
				if sc.Text() == "```" {
					break
				}
				body = append(body, sc.Text())
			}
			ex.script = strings.Join(body, "\n") + "\n"
			switch {
			case strings.HasPrefix(marker, "<!-- run by the tests"):
				ex.run = true
				m := strings.TrimSuffix(strings.TrimPrefix(marker, "<!-- run by the tests"), "-->")
				if v, ok := strings.CutPrefix(strings.TrimSpace(m), "; expect:"); ok {
					ex.expect = strings.TrimSpace(v)
				}
			case strings.HasPrefix(marker, "<!-- not run by the tests:"):
				ex.why = strings.TrimSpace(strings.TrimSuffix(strings.TrimPrefix(marker, "<!-- not run by the tests:"), "-->"))
			default:
				t.Errorf("%s: a ```sh block without a <!-- run by the tests --> or <!-- not run by the tests: WHY --> line before it", ex.line)
			}
			out = append(out, ex)
			marker = ""
		case strings.TrimSpace(line) != "":
			marker = ""
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestDocExamplesRun(t *testing.T) {
	needBinary(t)
	dir := t.TempDir()
	n := startNode(t, "docs", nodeArgs(filepath.Join(dir, "node"), "--backend", "demo:delay=0s", "--bridge", "127.0.0.1:0")...)
	apiAddr := n.value("api")
	bridgeAddr := strings.TrimSuffix(strings.TrimPrefix(n.value("bridge"), "http://"), "/")
	waitWorkers(t, apiAddr, "demo", n.value("peer"))
	// The docs' addresses are the defaults; this node has its own.
	addrs := strings.NewReplacer("127.0.0.1:5080", bridgeAddr, "localhost:5050", apiAddr, "127.0.0.1:5050", apiAddr)

	ran := 0
	for _, doc := range []string{"../../docs/operations.md", "../../docs/bridge-api.md"} {
		for _, ex := range docExamples(t, doc) {
			if !ex.run {
				t.Logf("%s: not run: %s", ex.line, ex.why)
				continue
			}
			ran++
			t.Run(ex.line, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
				defer cancel()
				cmd := exec.CommandContext(ctx, "bash", "-euo", "pipefail", "-c", addrs.Replace(ex.script))
				cmd.Dir = dir
				cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(e2eBin)+string(os.PathListSeparator)+os.Getenv("PATH"), "MTOR_API="+apiAddr)
				out, err := cmd.CombinedOutput()
				if err != nil {
					t.Fatalf("%s failed: %v\n%s\noutput:\n%s", ex.line, err, ex.script, out)
				}
				if ex.expect != "" && !strings.Contains(string(out), ex.expect) {
					t.Fatalf("%s: output lacks %q:\n%s", ex.line, ex.expect, out)
				}
			})
		}
	}
	if ran < 3 {
		t.Fatalf("ran %d examples; the docs mark at least 3", ran)
	}
}
