package main

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/protocol/pb"
)

// runCLI runs one command line in process and returns its exit code and
// output. HOME and the env defaults point into a temp dir so that nothing
// touches the real ~/.mtor.
func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	home := t.TempDir()
	e := &env{
		stdin:  strings.NewReader(""),
		stdout: &stdout,
		stderr: &stderr,
		getenv: func(k string) string {
			if k == "MTOR_DATA_DIR" {
				return filepath.Join(home, ".mtor")
			}
			return ""
		},
	}
	code := run(context.Background(), e, args)
	return code, stdout.String(), stderr.String()
}

func TestUsageErrorsExit2(t *testing.T) {
	tokenA, tokenB := joinToken(t, "alpha"), joinToken(t, "beta")
	cases := []struct {
		name string
		args []string
		want string // in the first line of stderr
	}{
		{"no command", nil, "a command is needed"},
		{"unknown command", []string{"frobnicate"}, `unknown command "frobnicate"`},
		{"unknown flag", []string{"peers", "--nope"}, "flag provided but not defined: -nope"},
		{"bad flag value", []string{"node", "--max-queue", "lots"}, "invalid value"},
		{"query without prompt", []string{"query", "--json"}, "a PROMPT is needed"},
		{"query api and join", []string{"query", "--api", "127.0.0.1:1", "--join", "/ip4/127.0.0.1/tcp/1", "hi"}, "exclude each other"},
		{"query bad type", []string{"query", "--type", "dance", "hi"}, "--type"},
		{"query bad timeout", []string{"query", "--timeout", "-1s", "hi"}, "--timeout"},
		{"query bad prefer", []string{"query", "--prefer", "cheap", "hi"}, "--prefer"},
		{"node bridge key without bridge", []string{"node", "--bridge-key", "k"}, "need --bridge"},
		{"node bridge origin without bridge", []string{"node", "--bridge-origin", "https://app.example"}, "need --bridge"},
		{"node bridge host without bridge", []string{"node", "--bridge-host", "gpu.example"}, "need --bridge"},
		{"node bridge host is a URL", []string{"node", "--bridge", "127.0.0.1:0", "--bridge-host", "http://gpu.example"}, "--bridge-host"},
		{"node bridge origin with path", []string{"node", "--bridge", "127.0.0.1:0", "--bridge-origin", "https://app.example/page"}, "--bridge-origin"},
		{"node bridge origin without scheme", []string{"node", "--bridge", "127.0.0.1:0", "--bridge-origin", "app.example"}, "--bridge-origin"},
		{"node negative bridge queue", []string{"node", "--bridge", "127.0.0.1:0", "--bridge-queue", "-1"}, "--bridge-queue"},
		{"node zero bridge queue per client", []string{"node", "--bridge", "127.0.0.1:0", "--bridge-queue-per-client", "0"}, "--bridge-queue-per-client"},
		{"node zero bridge queue wait", []string{"node", "--bridge", "127.0.0.1:0", "--bridge-queue-wait", "0s"}, "--bridge-queue-wait"},
		{"node negative bridge in flight", []string{"node", "--bridge", "127.0.0.1:0", "--bridge-max-in-flight", "-1"}, "--bridge-max-in-flight"},
		{"node bad api", []string{"node", "--api", "5050"}, "--api"},
		{"node bad bridge", []string{"node", "--bridge", "nowhere"}, "--bridge"},
		{"node stray argument", []string{"node", "extra"}, `unexpected argument "extra"`},
		{"node negative queue", []string{"node", "--max-queue", "-1"}, "--max-queue"},
		{"node zero concurrency", []string{"node", "--max-concurrency", "0"}, "--max-concurrency"},
		{"node canary rate above one", []string{"node", "--canary-rate", "1.5"}, "--canary-rate"},
		{"node negative canary rate", []string{"node", "--canary-rate", "-0.1"}, "--canary-rate"},
		{"node zero canary interval", []string{"node", "--canary-interval", "0s"}, "--canary-interval"},
		{"node energy slack too small", []string{"node", "--prefer-energy", "--energy-slack", "0.9"}, "--energy-slack"},
		{"node announce too fast", []string{"node", "--announce-interval", "1ms"}, "--announce-interval"},
		{"node zero open pacing", []string{"node", "--open-pacing", "0"}, "--open-pacing"},
		{"node open pacing past the stream backlog", []string{"node", "--open-pacing", "257"}, "--open-pacing"},
		{"node negative open queue", []string{"node", "--open-queue", "-1"}, "--open-queue"},
		{"node catalogue too fast", []string{"node", "--catalog-every", "10ms"}, "--catalog-every"},
		{"node catalogue too slow", []string{"node", "--catalog-every", "1h"}, "--catalog-every"},
		{"node bad backend", []string{"node", "--backend", "gopher=http://x", "--api", "off"}, "--backend"},
		{"node bad log level", []string{"node", "--log-level", "loud", "--api", "off"}, "--log-level"},
		{"node join without peer ID", []string{"node", "--join", "/ip4/127.0.0.1/tcp/1"}, "/p2p/"},
		{"node join neither address nor token", []string{"node", "--join", "bootstrap.example"}, "--join"},
		{"node join broken token", []string{"node", "--join", "mtor1!!"}, "--join: join token"},
		{"node join bad multiaddr", []string{"node", "--join", "/ip4/300.1.1.1/tcp/1/p2p/x"}, "--join"},
		{"node bad swarm", []string{"node", "--swarm", "Not A Name"}, "--swarm"},
		{"node swarm against token", []string{"node", "--swarm", "gamma", "--join", tokenA}, `join token is for swarm "alpha"`},
		{"node tokens of two swarms", []string{"node", "--join", tokenA, "--join", tokenB}, "different swarms"},
		{"node bad listen", []string{"node", "--listen", "/ip4/127.0.0.1/tcp/notaport"}, "--listen"},
		{"node listen not a multiaddr", []string{"node", "--listen", "0.0.0.0:4001"}, "--listen"},
		{"node bad backend url", []string{"node", "--backend", "ollama=localhost:11434"}, "--backend"},
		{"query bad join", []string{"query", "--join", "nonsense", "hi"}, "--join"},
		{"query bad listen", []string{"query", "--join", tokenA, "--listen", "/ip4/x", "hi"}, "--listen"},
		{"query bad swarm", []string{"query", "--join", tokenA, "--swarm", "Nope!", "hi"}, "--swarm"},
		{"query swarm without join", []string{"query", "--swarm", "alpha", "hi"}, "need --join"},
		{"peers stray argument", []string{"peers", "x"}, "unexpected argument"},
		{"version argument", []string{"version", "x"}, "no arguments"},
		{"bench bad concurrency", []string{"bench", "--concurrency", "1,zero"}, "--concurrency"},
		{"bench bad streams", []string{"bench", "--streams", "-1"}, "--streams"},
		{"bench bad queries", []string{"bench", "--queries", "0"}, "--queries"},
		{"bench bad transport", []string{"bench", "--transport", "tcp,udp"}, "--transport"},
		{"bench transport twice", []string{"bench", "--transport", "quic,quic"}, "--transport"},
		{"bench node-env without value", []string{"bench", "--node-env", "GOMAXPROCS"}, "node-env"},
		{"bench node-env without name", []string{"bench", "--node-env", "=1"}, "node-env"},
		{"bench node-env bad name", []string{"bench", "--node-env", "GO MAXPROCS=1"}, "node-env"},
		{"bench no tokens", []string{"bench", "--tokens", "0"}, "--tokens"},
		{"bench too many tokens", []string{"bench", "--tokens", "16,4097"}, "--tokens"},
		{"bench tokens twice", []string{"bench", "--tokens", "16,16"}, "--tokens"},
		{"bench tokens not a number", []string{"bench", "--tokens", "16,"}, "--tokens"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			dataDir := filepath.Join(t.TempDir(), "data")
			if len(args) > 0 && args[0] == "node" {
				args = append(args, "--data-dir", dataDir)
			}
			code, stdout, stderr := runCLI(t, args...)
			if code != exitUsage {
				t.Fatalf("exit %d, want 2; stdout %q stderr %q", code, stdout, stderr)
			}
			checkUsageError(t, stdout, stderr, tc.want)
			// A usage error stops the node before anything starts: not
			// even its identity is created.
			if _, err := os.Stat(dataDir); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the data dir exists after a usage error (%v)", err)
			}
		})
	}
}

// joinToken is a well-formed join token for swarm, naming a fresh peer.
func joinToken(t *testing.T, swarm string) string {
	t.Helper()
	_, pub, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return discovery.EncodeJoinToken(swarm, []peer.AddrInfo{{ID: id, Addrs: []ma.Multiaddr{ma.StringCast("/ip4/127.0.0.1/tcp/1")}}})
}

// checkUsageError asserts the contract of a usage error: nothing on
// stdout; on stderr one line saying what is wrong, and at most a hint.
func checkUsageError(t *testing.T, stdout, stderr, want string) {
	t.Helper()
	if stdout != "" {
		t.Errorf("stdout %q, want nothing", stdout)
	}
	lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
	if !strings.Contains(lines[0], want) {
		t.Errorf("stderr %q, want %q in its first line", stderr, want)
	}
	if len(lines) > 2 || len(lines) == 2 && !strings.HasPrefix(lines[1], "Run 'mtor ") {
		t.Errorf("stderr %q, want one line and at most a \"Run 'mtor ...\" hint", stderr)
	}
}

func TestHelpAndVersionExit0(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"--help"}, {"help", "query"}, {"query", "-h"}, {"node", "--help"}, {"version"}, {"--version"}} {
		code, stdout, stderr := runCLI(t, args...)
		if code != exitOK || stdout == "" || stderr != "" {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, stdout, stderr)
		}
	}
	_, stdout, _ := runCLI(t, "node", "-h")
	if n := strings.Count(stdout, "Usage: mtor node"); n != 1 {
		t.Errorf("node -h printed its usage %d times", n)
	}
	for _, flag := range []string{"-data-dir", "-listen", "-join", "-swarm", "-backend", "-api", "-bridge", "-bridge-key", "-bridge-key-file", "-bridge-origin", "-bridge-host", "-relay", "-no-mdns", "-max-concurrency", "-max-queue", "-announce-interval"} {
		if !strings.Contains(stdout, "  "+flag+" ") && !strings.Contains(stdout, "  "+flag+"\n") {
			t.Errorf("node help lacks %s", flag)
		}
	}
	_, stdout, _ = runCLI(t, "version")
	if !strings.HasPrefix(stdout, "mtor ") || !strings.Contains(stdout, "protocol 1.0.0") {
		t.Errorf("version %q", stdout)
	}
	// A command without flags has no empty "Flags:" section; a usage
	// string's back-quoted word does not become a flag's argument name.
	if _, stdout, _ = runCLI(t, "version", "-h"); stdout != "Usage: mtor version\n" {
		t.Errorf("version -h printed %q", stdout)
	}
	if _, stdout, _ = runCLI(t, "invite", "-h"); !strings.Contains(stdout, "  -peer string\n") {
		t.Errorf("invite -h does not name -peer's argument \"string\":\n%s", stdout)
	}
}

// Errors of a runnable command are exit 1 with one line on stderr.
func TestErrorsExit1OneLine(t *testing.T) {
	for _, args := range [][]string{
		{"peers", "--api", "127.0.0.1:1"},
		{"query", "--api", "127.0.0.1:1", "--model", "demo", "hi"},
	} {
		code, stdout, stderr := runCLI(t, args...)
		if code != exitError || stdout != "" {
			t.Errorf("%v: exit %d stdout %q", args, code, stdout)
		}
		if strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, "is `mtor node` running?") {
			t.Errorf("%v: stderr %q, want one line saying the node is not reachable", args, stderr)
		}
	}
}

func TestIDCreatesAndReusesIdentity(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	code, first, stderr := runCLI(t, "id", "--data-dir", dir)
	if code != 0 || !strings.HasPrefix(first, "12D3KooW") {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, first, stderr)
	}
	fi, err := os.Stat(filepath.Join(dir, "identity.key"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("identity mode %v, want 0600", fi.Mode().Perm())
	}
	_, again, _ := runCLI(t, "id", "--data-dir", dir)
	if again != first {
		t.Fatalf("second run printed %q, first %q", again, first)
	}
}

func TestParseFlagsInterspersed(t *testing.T) {
	cases := []struct {
		args     []string
		wantPos  []string
		wantJSON bool
		wantM    string
	}{
		{[]string{"hello", "--json"}, []string{"hello"}, true, ""},
		{[]string{"--model", "m", "hello", "world", "--json"}, []string{"hello", "world"}, true, "m"},
		{[]string{"--", "--json", "-x"}, []string{"--json", "-x"}, false, ""},
		{[]string{"a", "--", "--model"}, []string{"a", "--model"}, false, ""},
		{nil, nil, false, ""},
	}
	for _, tc := range cases {
		fs := newFlagSet(&env{stdout: &bytes.Buffer{}}, "t", "")
		j := fs.Bool("json", false, "")
		m := fs.String("model", "", "")
		pos, err := parseFlags(fs, tc.args)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if !reflect.DeepEqual(pos, tc.wantPos) || *j != tc.wantJSON || *m != tc.wantM {
			t.Errorf("%v: pos %q json %v model %q", tc.args, pos, *j, *m)
		}
	}
}

func TestPickModel(t *testing.T) {
	models := []router.ModelView{
		{Name: "b", Types: []string{"chat"}, Peers: 2},
		{Name: "a", Types: []string{"chat", "embed"}, Peers: 2},
		{Name: "big", Types: []string{"chat"}, Peers: 1},
		{Name: "sd", Types: []string{"imagine"}, Peers: 5},
	}
	for _, tc := range []struct {
		typ  pb.QueryType
		want string
	}{
		{pb.QueryType_QUERY_TYPE_CHAT, "a"}, // most peers, then by name
		{pb.QueryType_QUERY_TYPE_IMAGINE, "sd"},
		{pb.QueryType_QUERY_TYPE_EMBED, "a"},
		{pb.QueryType_QUERY_TYPE_TTS, ""},
	} {
		if got := pickModel(models, tc.typ); got != tc.want {
			t.Errorf("%v: %q, want %q", tc.typ, got, tc.want)
		}
	}
}

func TestPrintPeers(t *testing.T) {
	var b bytes.Buffer
	err := printPeers(&b, []api.Peer{
		{PeerView: router.PeerView{Peer: "12D3KooWA", Models: []router.ModelStat{{Name: "demo", Types: []string{"chat", "embed"}}, {Name: "x", Types: []string{"chat"}, JoulesPerToken: 0.42, Breaker: "open"}},
			InFlight: 1, MaxConcurrency: 4, Queued: 2, Health: 97, Breaker: "open", AgeMs: 1500, Reputation: 25, Distrusted: true,
			Reachability: "relayed", RelayedVia: []string{"12D3KooWRelay001", "12D3KooWRelay002"}, Path: "direct", Transports: []string{"quic-v1"}, HolePunched: true,
			GPUs: []router.GPUView{{Name: "NVIDIA H100", VRAMTotal: 80 << 30, VRAMFree: 60 << 30, UtilPercent: 35, PowerMW: 250000}}}},
		{PeerView: router.PeerView{Peer: "12D3KooWB", Self: true},
			Backends: []node.BackendState{{Name: "ollama http://127.0.0.1:1", State: node.BackendDown, Detail: "unreachable (connection refused)"}}},
		{PeerView: router.PeerView{Peer: "12D3KooWC", Roles: []string{"relay"}, Reachability: "public", Path: "direct", Transports: []string{"quic-v1", "tcp"}}, Relay: true},
		{PeerView: router.PeerView{Peer: "12D3KooWD", Models: []router.ModelStat{{Name: "demo"}}, MaxConcurrency: 1,
			Reachability: "relayed", RelayedVia: []string{"12D3KooWRelay001"}, Path: "relayed", Relay: "12D3KooWRelay001"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 6 {
		t.Fatalf("table %q", b.String())
	}
	for _, want := range []string{"PEER", "MODELS", "TYPES", "LOAD", "HEALTH", "REP", "REACH", "PATH", "GPU", "AGE"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("header %q lacks %s", lines[0], want)
		}
	}
	for _, want := range []string{"12D3KooWA", "demo,x (0.42 J/token) (open)", "chat,embed", "1/4 +2 queued", "97 (open)", "25 (distrusted)", "NVIDIA H100 60.0/80.0GiB free 35% 250W", "1.5s"} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("row %q lacks %q", lines[1], want)
		}
	}
	if !strings.Contains(lines[1], "relayed via Relay001,Relay002") || !strings.Contains(lines[1], "direct (hole punch, quic-v1)") {
		t.Errorf("row %q lacks its reachability and hole-punched path", lines[1])
	}
	for i, want := range map[int]string{2: "12D3KooWB (self)", 3: "12D3KooWC (relay) - - - - - public direct (quic-v1, tcp)",
		4: "relayed via Relay001 relayed via Relay001",
		5: "this node's backend: ollama http://127.0.0.1:1 unreachable (connection refused)"} {
		if !strings.Contains(strings.Join(strings.Fields(lines[i]), " "), want) {
			t.Errorf("line %q lacks %q", lines[i], want)
		}
	}
	b.Reset()
	_ = printPeers(&b, nil)
	if !strings.Contains(b.String(), "no workers") {
		t.Errorf("empty table %q", b.String())
	}
}

func TestOneLine(t *testing.T) {
	if got := oneLine("a\nb  c\n\n"); got != "a b c" {
		t.Errorf("%q", got)
	}
}
