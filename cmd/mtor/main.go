// Command mtor is the one mtor binary: a swarm node (worker, bridge,
// relay, bootstrap: roles switched on by flags) and the client commands
// that talk to a node's local control API.
//
// Exit codes: 0 ok, 1 error (one line on stderr), 2 usage.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"

	golog "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/gologshim"

	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/protocol"
)

// version is set at build time with -ldflags "-X main.version=...";
// otherwise it comes from the module's build info.
var version = ""

const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

// env is what a command sees of the process, so that tests can run
// commands in-process with their own streams.
type env struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string
}

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, e *env, args []string) error
}

func commands() []command {
	return []command{
		{"node", "run a swarm node (worker, bridge, relay, bootstrap)", runNode},
		{"query", "ask the swarm a question and stream the answer", runQuery},
		{"peers", "show the swarm's workers as a node sees them", runPeers},
		{"ledger", "show the work a node consumed from and served to each peer", runLedger},
		{"id", "print this machine's peer ID (creating the identity if needed)", runID},
		{"join-token", "print the running node's join token, for another node's --join", runJoinToken},
		{"swarm", "init: make this data dir the owner of a closed swarm", runSwarm},
		{"invite", "print a join token with an invite to the closed swarm (owner only)", runInvite},
		{"revoke", "revoke a member or an invite of the closed swarm (owner only)", runRevoke},
		{"version", "print the version", runVersion},
		{"bench", "measure query latency and throughput through the swarm", runBench},
		{"help", "show help for a command", nil},
	}
}

func main() {
	// Route go-libp2p's slog loggers through go-log before anything logs,
	// so GOLOG_LOG_LEVEL and --log-level govern every subsystem alike.
	gologshim.SetDefaultHandler(node.ErrorText(golog.SlogHandler()))
	e := &env{stdin: os.Stdin, stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv}
	os.Exit(run(context.Background(), e, os.Args[1:]))
}

// run executes one command line and returns the exit code. Errors are
// printed as one line; usage errors add a hint.
func run(ctx context.Context, e *env, args []string) int {
	if len(args) == 0 {
		fmt.Fprintf(e.stderr, "mtor: a command is needed\nRun 'mtor help' for the list of commands.\n")
		return exitUsage
	}
	name, rest := args[0], args[1:]
	switch name {
	case "-h", "-help", "--help":
		printUsage(e.stdout)
		return exitOK
	case "-v", "-version", "--version":
		name = "version"
	case "help":
		if len(rest) == 0 {
			printUsage(e.stdout)
			return exitOK
		}
		name, rest = rest[0], []string{"-h"}
	}
	var cmd *command
	for _, c := range commands() {
		if c.name == name && c.run != nil {
			cmd = &c
			break
		}
	}
	if cmd == nil {
		fmt.Fprintf(e.stderr, "mtor: unknown command %q\nRun 'mtor help' for the list of commands.\n", name)
		return exitUsage
	}
	err := cmd.run(ctx, e, rest)
	var ue *usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, errHelpShown):
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(e.stderr, "mtor %s: %s\nRun 'mtor %s -h' for usage.\n", cmd.name, oneLine(ue.msg), cmd.name)
		return exitUsage
	default:
		fmt.Fprintf(e.stderr, "mtor %s: %s\n", cmd.name, oneLine(err.Error()))
		return exitError
	}
}

func printUsage(w io.Writer) {
	fmt.Fprintf(w, "mtor %s: a peer-to-peer swarm for AI inference\n\nUsage: mtor <command> [flags] [args]\n\nCommands:\n", buildVersion())
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun 'mtor <command> -h' for the flags of a command.\n")
}

// usageError is a command line that cannot be run: exit code 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// errHelpShown ends a command after -h printed its help.
var errHelpShown = errors.New("help shown")

// oneLine keeps an error message to one line, as the CLI contract wants.
func oneLine(s string) string {
	s = strings.TrimSpace(s)
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}

// newFlagSet makes a flag set whose help (-h) goes to stdout and whose
// errors become usage errors rather than printed text; parseFlags makes
// sure that the help is printed for -h only.
func newFlagSet(e *env, name, usage string) *flag.FlagSet {
	fs := flag.NewFlagSet("mtor "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		fmt.Fprintf(e.stdout, "Usage: mtor %s\n", strings.TrimSpace(name+" "+usage))
		n := 0
		fs.VisitAll(func(*flag.Flag) { n++ })
		if n == 0 {
			return
		}
		fmt.Fprintf(e.stdout, "\nFlags:\n")
		fs.SetOutput(e.stdout)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	return fs
}

// parseFlags parses flags that may come before, between or after the
// positional arguments ("mtor query hello --json"); "--" ends flags.
func parseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	// The flag package calls Usage on every error, not only on -h: keep
	// it quiet while parsing, so that a usage error is one line on stderr.
	help := fs.Usage
	fs.Usage = func() {}
	defer func() { fs.Usage = help }()
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				help()
				return nil, errHelpShown
			}
			return nil, usagef("%v", err)
		}
		rest := fs.Args()
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(pos, rest...), nil
		}
		if len(rest) == 0 {
			return pos, nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string { return strings.Join(*l, ",") }

// Repeatable tells the config file that this flag takes a list.
func (l *stringList) Repeatable() bool { return true }

func (l *stringList) Set(v string) error {
	*l = append(*l, v)
	return nil
}

// buildVersion is the version this binary reports.
func buildVersion() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "dev"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev == "" {
		return "dev"
	}
	return "dev-" + rev + dirty
}

func runVersion(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "version", "")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("version takes no arguments")
	}
	bi, _ := debug.ReadBuildInfo()
	goVersion := "unknown"
	if bi != nil {
		goVersion = bi.GoVersion
	}
	fmt.Fprintf(e.stdout, "mtor %s (protocol %s, %s)\n", buildVersion(), protocol.Version, goVersion)
	return nil
}
