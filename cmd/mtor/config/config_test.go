package config

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }
func (l *list) Repeatable() bool   { return true }

type flags struct {
	swarm   string
	backend list
	relay   bool
	queue   int
	grace   time.Duration
	slack   float64
}

func newFlags() (*flag.FlagSet, *flags) {
	var f flags
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.StringVar(&f.swarm, "swarm", "", "")
	fs.Var(&f.backend, "backend", "")
	fs.BoolVar(&f.relay, "relay", false, "")
	fs.IntVar(&f.queue, "max-queue", 64, "")
	fs.DurationVar(&f.grace, "grace", 30*time.Second, "")
	fs.Float64Var(&f.slack, "slack", 2, "")
	fs.String("config", "", "")
	return fs, &f
}

func write(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestApply(t *testing.T) {
	const toml = "swarm = \"lab\"\nbackend = [\"ollama=http://127.0.0.1:11434\", \"openai=http://127.0.0.1:8000\"]\nrelay = true\nmax-queue = 8\ngrace = \"5s\"\nslack = 1.5\n"
	const yml = "swarm: lab\nbackend:\n  - ollama=http://127.0.0.1:11434\n  - openai=http://127.0.0.1:8000\nrelay: true\nmax-queue: 8\ngrace: 5s\nslack: 1.5\n"
	want := flags{swarm: "lab", backend: list{"ollama=http://127.0.0.1:11434", "openai=http://127.0.0.1:8000"}, relay: true, queue: 8, grace: 5 * time.Second, slack: 1.5}
	for _, tc := range []struct{ name, body string }{
		{"node.toml", toml}, {"node.yaml", yml}, {"node.yml", yml},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs, f := newFlags()
			if err := fs.Parse(nil); err != nil {
				t.Fatal(err)
			}
			cf, err := Load(write(t, tc.name, tc.body))
			if err != nil {
				t.Fatal(err)
			}
			if err := cf.Apply(fs, func(string) bool { return false }, "config"); err != nil {
				t.Fatal(err)
			}
			if f.swarm != want.swarm || strings.Join(f.backend, " ") != strings.Join(want.backend, " ") || f.relay != want.relay || f.queue != want.queue || f.grace != want.grace || f.slack != want.slack {
				t.Fatalf("got %+v, want %+v", *f, want)
			}
		})
	}
}

func TestCommandLineWins(t *testing.T) {
	fs, f := newFlags()
	if err := fs.Parse([]string{"--swarm", "cli", "--backend", "ollama=http://127.0.0.1:1"}); err != nil {
		t.Fatal(err)
	}
	set := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	cf, err := Load(write(t, "n.toml", "swarm = \"file\"\nbackend = [\"openai=http://127.0.0.1:2\"]\nmax-queue = 3\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := cf.Apply(fs, func(n string) bool { return set[n] }, "config"); err != nil {
		t.Fatal(err)
	}
	if f.swarm != "cli" || len(f.backend) != 1 || f.backend[0] != "ollama=http://127.0.0.1:1" || f.queue != 3 {
		t.Fatalf("got %+v", *f)
	}
}

func TestErrors(t *testing.T) {
	for _, tc := range []struct {
		name, file, body string
		want             error
		says             []string // in the message
	}{
		{"unknown key", "n.toml", "swarm = \"a\"\nbackends = [\"x\"]\n", ErrUnknownKey, []string{`"backends"`, "n.toml"}},
		{"unknown key yaml", "n.yaml", "lisen: /ip4/0.0.0.0/tcp/1\n", ErrUnknownKey, []string{`"lisen"`, "n.yaml"}},
		{"config in config", "n.toml", "config = \"other.toml\"\n", ErrUnknownKey, []string{`"config"`}},
		{"list for one value", "n.toml", "swarm = [\"a\", \"b\"]\n", ErrValue, []string{`"swarm"`, "not a list"}},
		{"table", "n.toml", "[swarm]\nname = \"a\"\n", ErrValue, []string{`"swarm"`}},
		{"bad duration", "n.yaml", "grace: 30\n", ErrValue, []string{`"grace"`}},
		{"bad bool", "n.toml", "relay = \"maybe\"\n", ErrValue, []string{`"relay"`}},
		// TOML keeps no float's text: a name that looks like one is
		// refused, not changed (1.10 would become 1.1).
		{"float for text", "n.toml", "swarm = 1.10\n", ErrValue, []string{`"swarm"`, "quotes"}},
		{"float in a list", "n.toml", "backend = [\"a\", 2.50]\n", ErrValue, []string{`"backend"`, "quotes"}},
		{"hex integer for text", "n.toml", "swarm = 0x10\n", ErrValue, []string{`"swarm"`, "quotes"}},
		{"integer with underscores in a list", "n.toml", "backend = [1_000]\n", ErrValue, []string{`"backend"`, "quotes"}},
		{"syntax", "n.toml", "swarm = \n", ErrSyntax, []string{"n.toml"}},
		{"yaml syntax", "n.yaml", "swarm: [a\n", ErrSyntax, []string{"n.yaml"}},
		{"duplicate yaml key", "n.yaml", "swarm: a\nswarm: b\n", ErrSyntax, []string{"n.yaml"}},
		{"format", "n.json", "{}", ErrFormat, []string{"n.json"}},
		{"too large", "n.toml", "# " + strings.Repeat("x", MaxSize) + "\n", ErrTooLarge, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs, _ := newFlags()
			_ = fs.Parse(nil)
			cf, err := Load(write(t, tc.file, tc.body))
			if err == nil {
				err = cf.Apply(fs, func(string) bool { return false }, "config")
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			for _, s := range tc.says {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
		})
	}
}

func TestEmptyFile(t *testing.T) {
	for _, name := range []string{"n.toml", "n.yaml"} {
		cf, err := Load(write(t, name, ""))
		if err != nil || len(cf.Values) != 0 {
			t.Fatalf("%s: %v, %v", name, cf, err)
		}
	}
}

func TestMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "none.toml"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("err = %v", err)
	}
}

// TestYAMLValuesAsWritten: a YAML value reaches its flag as written, as it
// would on the command line: an unquoted value that YAML reads as a number
// (an octal 0123456, a float 1.10, an integer past 2^64) is not turned
// into another number's text.
func TestYAMLValuesAsWritten(t *testing.T) {
	cf, err := Load(write(t, "node.yaml", "swarm: 1.10\nbackend: [0123456, 1234567890123456789012, 0x1F, 012_3, 'quoted']\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := cf.Values["swarm"]; len(got) != 1 || got[0] != "1.10" {
		t.Errorf("swarm %q, want 1.10", got)
	}
	if got, want := strings.Join(cf.Values["backend"], " "), "0123456 1234567890123456789012 0x1F 012_3 quoted"; got != want {
		t.Errorf("backend %q, want %q", got, want)
	}
}
