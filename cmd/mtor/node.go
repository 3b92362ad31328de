package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	golog "github.com/ipfs/go-log/v2"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"

	"github.com/mtor-swarm/mtor/bridge"
	"github.com/mtor-swarm/mtor/cmd/mtor/config"
	"github.com/mtor-swarm/mtor/discovery"
	"github.com/mtor-swarm/mtor/node"
	"github.com/mtor-swarm/mtor/node/api"
	"github.com/mtor-swarm/mtor/node/api/hostcheck"
	"github.com/mtor-swarm/mtor/node/backend"
	"github.com/mtor-swarm/mtor/node/backend/spec"
	"github.com/mtor-swarm/mtor/node/canary"
	"github.com/mtor-swarm/mtor/node/gpu"
	"github.com/mtor-swarm/mtor/node/membership"
	"github.com/mtor-swarm/mtor/node/router"
	"github.com/mtor-swarm/mtor/node/worker"
	"github.com/mtor-swarm/mtor/protocol"
)

type nodeFlags struct {
	configPath       string
	dataDir          string
	listen           stringList
	join             stringList
	swarm            string
	backends         stringList
	apiAddr          string
	bridgeAddr       string
	bridgeKeys       stringList
	bridgeKeyFile    string
	bridgeOrigins    stringList
	bridgeQueue      int
	bridgeQueuePerCl int
	bridgeQueueWait  time.Duration
	bridgeInFlight   int
	bridgeHosts      stringList
	relay            bool
	announce         stringList
	reachability     string
	noMDNS           bool
	swarmView        bool
	swarmViewSet     bool // --swarm-view given (command line or config); else swarmViewFor decides
	watch            stringList
	noDetect         bool
	maxConcurrency   int
	maxQueue         int
	announceInterval time.Duration
	grace            time.Duration
	logLevel         string
	canaryRate       float64
	canaryInterval   time.Duration
	verify           bool
	preferContrib    bool
	preferEnergy     bool
	energySlack      float64
	openPacing       int
	openQueue        int
	catalogEvery     time.Duration
}

func defaultDataDir(e *env) string {
	if d := e.getenv("MTOR_DATA_DIR"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		return ".mtor"
	}
	return filepath.Join(home, ".mtor")
}

func defaultAPIAddr(e *env) string {
	if a := e.getenv("MTOR_API"); a != "" {
		return a
	}
	return api.DefaultAddr
}

// nodeFlagSet is the flag set of `mtor node`, filling f.
func nodeFlagSet(e *env, f *nodeFlags) *flag.FlagSet {
	fs := newFlagSet(e, "node", "[flags]")
	fs.StringVar(&f.configPath, "config", "", "read flags from a TOML (.toml) or YAML (.yaml, .yml) file, a key per flag (a list for a repeatable one); flags on the command line win; SIGHUP re-reads its backend and no-detect")
	fs.StringVar(&f.dataDir, "data-dir", defaultDataDir(e), "directory for the identity key and state (env MTOR_DATA_DIR)")
	fs.Var(&f.listen, "listen", "multiaddr to listen on, repeatable (default /ip4/0.0.0.0/tcp/4001 and /ip4/0.0.0.0/udp/4001/quic-v1)")
	fs.Var(&f.join, "join", "bootstrap multiaddr (/ip4/.../p2p/ID) or join token to join through, repeatable")
	fs.StringVar(&f.swarm, "swarm", "", "swarm name (default: the join token's swarm, else \"mtor\")")
	fs.Var(&f.backends, "backend", "model server to serve, repeatable: "+spec.Kinds+" (default: auto-detect local servers)")
	fs.StringVar(&f.apiAddr, "api", defaultAPIAddr(e), "local control API address HOST:PORT, or \"off\" (env MTOR_API)")
	fs.StringVar(&f.bridgeAddr, "bridge", "", "serve the web UI and OpenAI-compatible API on HOST:PORT")
	fs.Var(&f.bridgeKeys, "bridge-key", "API key the bridge requires (Authorization: Bearer KEY), repeatable")
	fs.StringVar(&f.bridgeKeyFile, "bridge-key-file", "", "file of bridge API keys, one a line")
	fs.Var(&f.bridgeOrigins, "bridge-origin", "web origin (scheme://host[:port], or *) whose pages may call the bridge's API and /ws, repeatable (default: same origin only)")
	fs.IntVar(&f.bridgeQueue, "bridge-queue", bridge.DefaultQueue, "queries that may wait at the bridge for a slot in the swarm; more are refused at once (429, WebSocket BUSY); 0: no waiting")
	fs.IntVar(&f.bridgeQueuePerCl, "bridge-queue-per-client", bridge.DefaultQueuePerClient, "queries one client (API key, else IP address; WebSocket user) may have waiting")
	fs.DurationVar(&f.bridgeQueueWait, "bridge-queue-wait", bridge.DefaultQueueWait, "longest a query waits at the bridge for a slot before it is refused as busy")
	fs.IntVar(&f.bridgeInFlight, "bridge-max-in-flight", 0, "queries the bridge runs in the swarm at once (0: the swarm's capacity, the sum of its workers' --max-concurrency)")
	fs.Var(&f.bridgeHosts, "bridge-host", "host name (or *) that a bridge without --bridge-key answers to besides localhost, loopback and its own addresses, repeatable; other Host headers get 403 (DNS rebinding)")
	fs.BoolVar(&f.relay, "relay", false, "serve circuit relay v2 for peers behind NAT")
	fs.Var(&f.announce, "announce", "address others can reach this node on that it cannot see itself (a port forward: /ip4/PUBLIC_IP/tcp/PORT), repeatable")
	fs.StringVar(&f.reachability, "reachability", "auto", "auto (AutoNAT decides; no public address means private meanwhile), public (no relays) or private (always hold relay reservations)")
	fs.BoolVar(&f.noMDNS, "no-mdns", false, "do not look for peers on the local network with mDNS")
	fs.BoolVar(&f.swarmView, "swarm-view", true, "follow every announcement of the swarm (peers list, model list, web page); false: only those of the models this node routes to, at most 16 workers of each, for large swarms (default: on, but off for a worker without --bridge or --verify)")
	fs.Var(&f.watch, "watch", "without the swarm view (implies --swarm-view=false): a model whose workers to follow from the start rather than from its first query, repeatable")
	fs.BoolVar(&f.noDetect, "no-detect", false, "with no --backend: do not look for local model servers (serve no models)")
	fs.IntVar(&f.maxConcurrency, "max-concurrency", worker.DefaultMaxConcurrency, "queries the worker runs at once")
	fs.IntVar(&f.maxQueue, "max-queue", worker.DefaultMaxQueue, "queries the worker queues beyond those running; more are refused with BUSY")
	fs.DurationVar(&f.announceInterval, "announce-interval", node.DefaultAnnounceInterval, "heartbeat of the worker's announcements")
	fs.DurationVar(&f.grace, "grace", node.DefaultGracePeriod, "on SIGINT/SIGTERM, how long queries in flight may take to finish")
	fs.Float64Var(&f.canaryRate, "canary-rate", canary.DefaultRate, "share of this node's routed queries spent on honesty spot checks of the workers (0: none, at most 1)")
	fs.DurationVar(&f.canaryInterval, "canary-interval", canary.DefaultInterval, "least time between two spot checks; with --verify, the time between them")
	fs.BoolVar(&f.verify, "verify", false, "run a spot check every --canary-interval whatever this node's own traffic (a volunteer verifier)")
	fs.BoolVar(&f.preferContrib, "prefer-contributors", false, "when queries queue for this worker, serve first the peers that did more work for this node than it did for them (see mtor ledger)")
	fs.BoolVar(&f.preferEnergy, "prefer-energy", false, "route each query to the worker with the lowest measured joules per token among those within --energy-slack of the best expected latency (a query's own preference overrides: X-Mtor-Prefer, or prefer in POST /v1/query, mtor query and WebSocket queries)")
	fs.Float64Var(&f.energySlack, "energy-slack", router.DefaultEnergySlack, "with energy preferred (--prefer-energy, or a query's own preference): how many times the best expected latency, plus 10 ms, a worker may take and still be chosen for its energy (> 1)")
	fs.IntVar(&f.openPacing, "open-pacing", router.DefaultOpensPerPeer, "query streams this node may be opening to one worker at once (opened, no Accepted yet); the others wait their turn")
	fs.IntVar(&f.openQueue, "open-queue", router.DefaultOpenQueuePerPeer, "queries that may wait for such a turn, per worker; more are refused with BUSY at once")
	fs.DurationVar(&f.catalogEvery, "catalog-every", discovery.DefaultCatalogEvery, "period of the swarm's model catalogue, which nodes with the swarm view publish and nodes without it read (0: off)")
	fs.StringVar(&f.logLevel, "log-level", "", "log level for every subsystem: debug, info, warn, error (default: GOLOG_LOG_LEVEL, else error)")
	return fs
}

// parseNodeFlags parses the command line and the config file it names,
// and checks the result: what `mtor node` runs with, and where its
// backends come from.
func parseNodeFlags(e *env, args []string) (*nodeFlags, backendSource, error) {
	f := &nodeFlags{}
	fs := nodeFlagSet(e, f)
	pos, err := parseFlags(fs, args)
	if err != nil {
		return nil, backendSource{}, err
	}
	if len(pos) > 0 {
		return nil, backendSource{}, usagef("unexpected argument %q", pos[0])
	}
	onCLI := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { onCLI[fl.Name] = true })
	src := backendSource{cliSpecs: slices.Clone(f.backends), cliNoDetect: f.noDetect,
		fromCLI: onCLI["backend"] || onCLI["no-detect"], configPath: f.configPath}
	if f.configPath != "" {
		cf, err := config.Load(f.configPath)
		if err != nil {
			return nil, backendSource{}, usagef("%v", err)
		}
		// --backend and --no-detect say together where the backends come
		// from: either on the command line replaces both of the file's.
		set := func(name string) bool {
			return onCLI[name] || (src.fromCLI && (name == "backend" || name == "no-detect"))
		}
		if err := cf.Apply(fs, set, "config"); err != nil {
			return nil, backendSource{}, usagef("%v", err)
		}
	}
	fs.Visit(func(fl *flag.Flag) { f.swarmViewSet = f.swarmViewSet || fl.Name == "swarm-view" })
	if err := f.check(); err != nil {
		return nil, backendSource{}, err
	}
	return f, src, nil
}

func runNode(ctx context.Context, e *env, args []string) error {
	f, src, err := parseNodeFlags(e, args)
	if err != nil {
		return err
	}
	if f.logLevel != "" {
		if _, err := golog.Parse(f.logLevel); err != nil {
			return usagef("--log-level: %v", err)
		}
		// "*" sets the default level too, not only that of the loggers
		// that exist by now: most of go-libp2p's are made later.
		_ = golog.SetLogLevel("*", f.logLevel)
	}

	if prefix := e.getenv("MTOR_CPUPROFILE"); prefix != "" {
		var after time.Duration
		if v := e.getenv("MTOR_CPUPROFILE_AFTER"); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil || d < 0 {
				return usagef("MTOR_CPUPROFILE_AFTER: %q is not a duration", v)
			}
			after = d
		}
		stop, err := startCPUProfile(prefix, after)
		if err != nil {
			return err
		}
		defer stop()
	}

	// The identity's errors name it ("identity /x/identity.key is
	// corrupt"): no prefix of ours.
	priv, err := node.LoadOrCreateIdentity(f.dataDir)
	if err != nil {
		return err
	}
	self, err := peer.IDFromPrivateKey(priv)
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	members, err := closedSwarm(f.dataDir, self, f.join)
	if err != nil {
		return err
	}
	// Before anything prints: a port that another node holds is refused
	// (see checkListenFree).
	if err := checkListenFree(f.listenAddrs(), len(f.listen) > 0); err != nil {
		return err
	}
	// The backends as SIGHUP will read them again: the config file, not
	// the command line, is their source when the command line has none.
	specs, err := src.specs(ctx, e)
	if err != nil {
		return usagef("%v", err)
	}
	bset := newBackendSet(shortID(self))
	backends, err := bset.build(specs)
	if err != nil {
		return err
	}

	// Bind the local listeners before the node starts, so that a port in
	// use fails at once and not after joining the swarm.
	var apiLn, bridgeLn net.Listener
	if f.apiAddr != "off" {
		if apiLn, err = net.Listen("tcp", f.apiAddr); err != nil {
			return fmt.Errorf("control API on %s: %w (choose another with --api HOST:PORT, or --api off)", f.apiAddr, err)
		}
		defer apiLn.Close()
	}
	if f.bridgeAddr != "" {
		if bridgeLn, err = net.Listen("tcp", f.bridgeAddr); err != nil {
			return fmt.Errorf("bridge on %s: %w", f.bridgeAddr, err)
		}
		defer bridgeLn.Close()
	}

	// GPU telemetry: a machine without NVIDIA's library simply has none.
	gpus := gpu.Open()
	defer gpus.Close()

	// Notices (a backend going down, the join failing) are printed as they
	// come, but only after the start-up lines, so that "join:" stays last.
	out := newNoticePrinter(e)
	nopts := append(f.options(backends), node.WithIdentity(priv), node.WithGPUMonitor(gpus), node.WithNotify(out.notice))
	if members != nil {
		nopts = append(nopts, node.WithMembership(members))
		if f.swarm == "" {
			nopts = append(nopts, node.WithSwarm(members.Swarm()))
		}
	}
	n, err := node.New(ctx, nopts...)
	if err != nil {
		return fmt.Errorf("starting the node: %w", err)
	}
	defer n.Close()
	trimCtx, stopTrim := context.WithCancel(ctx)
	defer stopTrim()
	go trimWhenIdle(trimCtx, trimPeriod, trimIdleAlloc, newMemSampler().read, debug.FreeOSMemory)

	// Everything below runs until a signal or a server failure.
	failed := make(chan error, 2)
	var servers sync.WaitGroup // the API and bridge serving loops
	var apiSrv *api.Server
	if apiLn != nil {
		remote := !isLoopbackListen(f.apiAddr)
		apiSrv = api.NewServer(n, n.Router(), api.WithVersion(buildVersion()), api.WithAllowRemote(remote))
		if remote {
			fmt.Fprintf(e.stderr, "warning: the control API on %s accepts clients from other machines and has no authentication\n", apiLn.Addr())
		}
		servers.Go(func() {
			if err := apiSrv.Serve(apiLn); err != nil {
				failed <- fmt.Errorf("control API: %w", err)
			}
		})
	}
	bridgeCtx, stopBridge := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBridge()
	if bridgeLn != nil {
		bs, err := bridge.New(n.Router(), f.bridgeOptions(n)...)
		if err != nil {
			return err // the bridge's errors start with "bridge: "
		}
		servers.Go(func() {
			if err := bs.Serve(bridgeCtx, bridgeLn); err != nil && !errors.Is(err, context.Canceled) {
				failed <- fmt.Errorf("bridge: %w", err)
			}
		})
	}

	// Listen for signals before printing the join line: a script that
	// stops the node as soon as it sees that line must get a clean exit.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	// SIGHUP reloads the backends; it has its own channel so that a
	// reload never swallows a stop signal.
	hups := make(chan os.Signal, 1)
	signal.Notify(hups, syscall.SIGHUP)
	defer signal.Stop(hups)
	out.startup(func() { printStartup(e, n, gpus, apiLn, bridgeLn) })
	var runErr error
wait:
	for {
		select {
		case <-hups:
			reloadBackends(ctx, e, n, src, bset, out)
		case sig := <-sigs:
			if prefix := e.getenv("MTOR_MEMPROFILE"); prefix != "" {
				// What the running node holds, before the stop lets it go.
				if err := writeHeapProfile(prefix); err != nil {
					fmt.Fprintln(e.stderr, err)
				}
			}
			fmt.Fprintf(e.stderr, "%s: stopping; queries in flight get %s to finish (send it again to stop at once)\n", sig, f.grace)
			break wait
		case runErr = <-failed:
			fmt.Fprintf(e.stderr, "stopping: %v\n", runErr)
			break wait
		case <-ctx.Done():
			break wait
		}
	}
	go func() {
		// A second signal means now: no more waiting for anyone.
		sig := <-sigs
		fmt.Fprintf(e.stderr, "%s again: exiting at once\n", sig)
		os.Exit(exitError)
	}()

	// Refuse new work from the swarm at once; let the local clients (API,
	// bridge) finish their queries, which may be answered elsewhere; then
	// let the worker's queries in flight finish and close. All within the
	// one grace period.
	graceCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), f.grace)
	defer cancel()
	n.Worker().Drain()
	var wg sync.WaitGroup
	if apiSrv != nil {
		wg.Go(func() { _ = apiSrv.Shutdown(graceCtx) })
	}
	stopBridge()
	wg.Go(servers.Wait)
	// The worker's own queries finish, or are handed back to their
	// clients just before the grace runs out, while the servers drain.
	wg.Go(func() { n.Drain(graceCtx) })
	wg.Wait()
	shutdownErr := n.Close()
	if runErr != nil {
		return runErr
	}
	if shutdownErr != nil && !errors.Is(shutdownErr, context.DeadlineExceeded) {
		return fmt.Errorf("shutdown: %w", shutdownErr)
	}
	return nil
}

func (f *nodeFlags) check() error {
	if f.dataDir == "" {
		return usagef("--data-dir must not be empty")
	}
	if len(f.watch) > 0 && f.swarmViewSet && f.swarmView {
		return usagef("--watch follows models without the swarm view: it excludes --swarm-view=true")
	}
	if f.canaryRate < 0 || f.canaryRate > 1 || f.canaryRate != f.canaryRate {
		return usagef("--canary-rate %v: want a share from 0 to 1", f.canaryRate)
	}
	if f.canaryInterval <= 0 {
		return usagef("--canary-interval %v: want a positive duration", f.canaryInterval)
	}
	if f.apiAddr != "off" {
		if _, _, err := net.SplitHostPort(f.apiAddr); err != nil {
			return usagef("--api %q: want HOST:PORT or off", f.apiAddr)
		}
	}
	if f.bridgeAddr != "" {
		if _, _, err := net.SplitHostPort(f.bridgeAddr); err != nil {
			return usagef("--bridge %q: want HOST:PORT", f.bridgeAddr)
		}
	}
	if f.bridgeAddr == "" && (len(f.bridgeKeys) > 0 || f.bridgeKeyFile != "" || len(f.bridgeOrigins) > 0 || len(f.bridgeHosts) > 0) {
		return usagef("--bridge-key, --bridge-key-file, --bridge-origin and --bridge-host need --bridge")
	}
	if _, err := hostcheck.New(f.bridgeHosts...); err != nil {
		return usagef("--bridge-host: %v", err)
	}
	switch {
	case f.bridgeQueue < 0:
		return usagef("--bridge-queue %d must be >= 0", f.bridgeQueue)
	case f.bridgeQueuePerCl <= 0:
		return usagef("--bridge-queue-per-client %d must be > 0", f.bridgeQueuePerCl)
	case f.bridgeQueueWait <= 0:
		return usagef("--bridge-queue-wait %s must be > 0", f.bridgeQueueWait)
	case f.bridgeInFlight < 0:
		return usagef("--bridge-max-in-flight %d must be >= 0", f.bridgeInFlight)
	case !(f.energySlack > 1 && f.energySlack <= 100):
		return usagef("--energy-slack %v must be above 1 and at most 100", f.energySlack)
	case f.openPacing < 1 || f.openPacing > maxOpenPacing:
		// More than yamux's backlog of unacknowledged opens (and QUIC's
		// streams per connection), 256, would only queue there instead.
		return usagef("--open-pacing %d must be within [1, %d]", f.openPacing, maxOpenPacing)
	case f.openQueue < 0 || f.openQueue > maxOpenQueue:
		return usagef("--open-queue %d must be within [0, %d]", f.openQueue, maxOpenQueue)
	case f.catalogEvery != 0 && (f.catalogEvery < discovery.MinCatalogEvery || f.catalogEvery > discovery.MaxCatalogEvery):
		return usagef("--catalog-every %s must be 0 (off) or within [%s, %s]", f.catalogEvery, discovery.MinCatalogEvery, discovery.MaxCatalogEvery)
	}
	for _, o := range f.bridgeOrigins {
		if err := checkOrigin(o); err != nil {
			return err
		}
	}
	if f.noDetect && len(f.backends) > 0 {
		return usagef("--no-detect and --backend exclude each other")
	}
	if err := checkNetFlags(f.swarm, f.join, f.listen); err != nil {
		return err
	}
	if _, err := node.ParseReachability(f.reachability); err != nil {
		return usagef("--reachability: %v", err)
	}
	for _, a := range f.announce {
		if _, err := node.ParseAnnounceAddr(a); err != nil {
			return usagef("--announce: %v", err)
		}
	}
	for _, s := range f.backends {
		// Parsed again, with this node's label, once the identity is
		// loaded; here only to refuse a bad spec before anything starts.
		if _, err := spec.Parse(s, ""); err != nil {
			return usagef("--backend: %v", err)
		}
	}
	if f.maxConcurrency < 1 || f.maxQueue < 0 || f.maxConcurrency > protocol.MaxAnnSlots || f.maxQueue > protocol.MaxAnnSlots {
		return usagef("--max-concurrency must be within [1, %d] and --max-queue within [0, %d]", protocol.MaxAnnSlots, protocol.MaxAnnSlots)
	}
	if f.announceInterval < 100*time.Millisecond || f.announceInterval > 3*time.Minute {
		return usagef("--announce-interval must be within [100ms, 3m]")
	}
	if f.grace < 0 {
		return usagef("--grace must not be negative")
	}
	return nil
}

// checkNetFlags validates --swarm, --join and --listen as node.New would,
// so that a mistake in them is a usage error before anything starts.
func checkNetFlags(swarm string, joins, listen []string) error {
	if swarm != "" {
		if err := protocol.ValidateSwarm(swarm); err != nil {
			return usagef("--swarm: %v", err)
		}
	}
	tokenSwarm := ""
	for _, j := range joins {
		s, _, err := discovery.ParseJoin(j)
		if err != nil {
			return usagef("--join: %v", err)
		}
		switch {
		case s == "":
		case tokenSwarm != "" && s != tokenSwarm:
			return usagef("--join: the join tokens name different swarms, %q and %q", tokenSwarm, s)
		case swarm != "" && s != swarm:
			return usagef("--swarm %q but the join token is for swarm %q", swarm, s)
		default:
			tokenSwarm = s
		}
	}
	for _, l := range listen {
		if _, err := ma.NewMultiaddr(l); err != nil {
			return usagef("--listen: %v", err)
		}
	}
	return nil
}

// swarmViewFor is whether the node follows the whole swarm: as
// --swarm-view says, else on, except for a pure worker (it serves models,
// runs no bridge and is no verifier). A pure worker routes nothing of its
// own, so reading every node's heartbeat would only cost it gossip that
// grows with the swarm (docs/benchmarks.md, "Scale"); it still finds
// relays through the relay topic and, if it ever routes a query, the
// workers of that model through the DHT.
func (f *nodeFlags) swarmViewFor(backends []backend.Backend) bool {
	if f.swarmViewSet {
		return f.swarmView
	}
	if len(f.watch) > 0 {
		return false // --watch is for a node without the view
	}
	return !f.pureWorker(backends)
}

// pureWorker is whether the node serves models and lists none for anyone
// (no bridge, no verifier): without the swarm view it does not read the
// model catalogue, whose only use is the model lists people see.
func (f *nodeFlags) pureWorker(backends []backend.Backend) bool {
	return len(backends) > 0 && f.bridgeAddr == "" && !f.verify
}

func (f *nodeFlags) options(backends []backend.Backend) []node.Option {
	opts := []node.Option{
		node.WithDataDir(f.dataDir),
		node.WithMDNS(!f.noMDNS),
		node.WithSwarmView(f.swarmViewFor(backends)),
		node.WithCatalogReader(!f.pureWorker(backends)),
		node.WithWatch(f.watch...),
		node.WithRelayService(f.relay),
		node.WithAnnounceAddrs(f.announce...),
		node.WithGracePeriod(f.grace),
		node.WithVersion(buildVersion()),
	}
	if r, err := node.ParseReachability(f.reachability); err == nil {
		opts = append(opts, node.WithReachability(r))
	}
	if f.bridgeAddr != "" {
		opts = append(opts, node.WithRoles("bridge"))
	}
	if len(f.listen) > 0 {
		opts = append(opts, node.WithListenAddrs(f.listen...))
	}
	if len(f.join) > 0 {
		opts = append(opts, node.WithJoin(f.join...))
	}
	if f.swarm != "" {
		opts = append(opts, node.WithSwarm(f.swarm))
	}
	if len(backends) > 0 {
		opts = append(opts, node.WithBackends(backends...))
	}
	opts = append(opts,
		node.WithMaxConcurrency(f.maxConcurrency),
		node.WithMaxQueue(f.maxQueue),
		node.WithAnnounceInterval(f.announceInterval),
		node.WithCanary(canary.WithRate(f.canaryRate), canary.WithInterval(f.canaryInterval)),
		node.WithPreferContributors(f.preferContrib))
	if f.verify {
		opts = append(opts, node.WithVerify())
	}
	// The slack also applies to the queries that ask for energy
	// themselves, whatever the node's default preference.
	opts = append(opts, node.WithRouterOptions(router.WithPreferEnergy(f.preferEnergy, f.energySlack), router.WithOpenPacing(f.openPacing, f.openQueue)),
		node.WithDiscoveryOptions(discovery.WithCatalog(f.catalogEvery)))
	return opts
}

// Bounds of --open-pacing and --open-queue.
const (
	maxOpenPacing = 256
	maxOpenQueue  = 1 << 16
)

func (f *nodeFlags) bridgeOptions(n *node.Node) []bridge.Option {
	opts := []bridge.Option{bridge.WithSelfID(n.ID().String()), bridge.WithShutdownGrace(f.grace), bridge.WithLedger(n.Ledger()),
		bridge.WithQueue(f.bridgeQueue), bridge.WithQueuePerClient(f.bridgeQueuePerCl),
		bridge.WithQueueWait(f.bridgeQueueWait), bridge.WithMaxInFlight(f.bridgeInFlight)}
	if len(f.bridgeKeys) > 0 {
		opts = append(opts, bridge.WithAPIKeys(f.bridgeKeys))
	}
	if f.bridgeKeyFile != "" {
		opts = append(opts, bridge.WithAPIKeyFile(f.bridgeKeyFile))
	}
	// The bridge answers to the name it was told to bind, when it is a
	// name (--bridge gpu.lan:8080); addresses it knows by itself.
	hosts := slices.Clone(f.bridgeHosts)
	if h, _, err := net.SplitHostPort(f.bridgeAddr); err == nil && h != "" && net.ParseIP(h) == nil {
		hosts = append(hosts, h)
	}
	if len(hosts) > 0 {
		opts = append(opts, bridge.WithAllowedHosts(hosts...))
	}
	if len(f.bridgeOrigins) > 0 {
		// The bridge gives the same list to its WebSocket as the Origin
		// allow-list of /ws.
		opts = append(opts, bridge.WithCORSOrigins(f.bridgeOrigins))
	}
	return opts
}

// checkOrigin refuses a --bridge-origin that bridge.WithCORSOrigins would
// refuse, so that the mistake is a usage error before the node starts.
func checkOrigin(o string) error {
	if o == "*" {
		return nil
	}
	u, err := url.Parse(o)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.User != nil {
		return usagef("--bridge-origin %q: want scheme://host[:port], e.g. https://app.example.com, or *", o)
	}
	return nil
}

// isLoopbackListen reports whether HOST:PORT binds only loopback; an empty
// host binds every interface.
func isLoopbackListen(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil || host == "" {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// shortID is the tail of a peer ID, enough for people to tell peers apart.
func shortID(id peer.ID) string {
	s := id.String()
	if len(s) > 8 {
		return s[len(s)-8:]
	}
	return s
}

// printStartup prints the node's identity, addresses and state as
// "key: value" lines on stdout, the join line last: scripts can wait for
// "join: ". A backend that is down is said here too, and again on stderr,
// where an operator who looks only at errors sees it.
func printStartup(e *env, n *node.Node, gpus *gpu.Monitor, apiLn, bridgeLn net.Listener) {
	w := e.stdout
	st := n.State()
	fmt.Fprintf(w, "mtor %s\n", buildVersion())
	fmt.Fprintf(w, "peer: %s\n", n.ID())
	fmt.Fprintf(w, "swarm: %s\n", n.SwarmName())
	for _, a := range n.Addrs() {
		fmt.Fprintf(w, "listen: %s\n", a)
	}
	roles := "none (routes queries and helps peers find each other)"
	if len(st.Roles) > 0 {
		roles = strings.Join(st.Roles, ", ")
	}
	fmt.Fprintf(w, "roles: %s\n", roles)
	if m := n.Membership(); m != nil {
		fmt.Fprintf(w, "membership: %s\n", membershipLine(m))
	}
	fmt.Fprintf(w, "reachability: %s\n", st.Reachability)
	if len(st.Backends) == 0 {
		fmt.Fprintf(w, "backends: none; this node serves no models but routes queries and helps others find each other\n")
	}
	for _, b := range st.Backends {
		fmt.Fprintf(w, "backend: %s\n", backendLine(b, st.ProbeInterval))
		if b.State == node.BackendDown {
			fmt.Fprintf(e.stderr, "warning: backend %s\n", backendLine(b, st.ProbeInterval))
		}
	}
	fmt.Fprintf(w, "gpu: %s\n", gpus)
	fmt.Fprintf(w, "peers: %d connected\n", st.ConnectedPeers)
	if apiLn != nil {
		fmt.Fprintf(w, "api: %s\n", apiLn.Addr())
	}
	if bridgeLn != nil {
		fmt.Fprintf(w, "bridge: http://%s/\n", bridgeLn.Addr())
	}
	fmt.Fprintf(w, "join: %s\n", n.JoinLine())
}

// backendLine is a backend's state for the operator, with what the node
// does about a backend that is down.
func backendLine(b node.BackendState, probe time.Duration) string {
	if b.State == node.BackendDown {
		return fmt.Sprintf("%s; retrying every %s", b, probe)
	}
	return b.String()
}

// noticePrinter prints the node's notices: changes on stdout as
// "key: value" lines, warnings on stderr. Notices that come before the
// start-up lines are held until those are out.
type noticePrinter struct {
	e       *env
	mu      sync.Mutex
	started bool
	held    []node.Notice
}

func newNoticePrinter(e *env) *noticePrinter { return &noticePrinter{e: e} }

func (p *noticePrinter) notice(n node.Notice) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.started {
		p.held = append(p.held, n)
		return
	}
	p.print(n)
}

// startup runs print (the start-up lines) and then the notices held.
func (p *noticePrinter) startup(print func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	print()
	p.started = true
	for _, n := range p.held {
		p.print(n)
	}
	p.held = nil
}

// line prints one line on stdout, after the start-up lines.
func (p *noticePrinter) line(text string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintln(p.e.stdout, text)
}

// warn prints a warning on stderr.
func (p *noticePrinter) warn(text string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.e.stderr, "warning: %s\n", text)
}

func (p *noticePrinter) print(n node.Notice) {
	switch {
	case n.Kind == node.NoticeBackend:
		fmt.Fprintf(p.e.stdout, "backend: %s\n", n.Text)
		if n.Warning {
			fmt.Fprintf(p.e.stderr, "warning: backend %s\n", n.Text)
		}
	case n.Warning:
		fmt.Fprintf(p.e.stderr, "warning: %s\n", n.Text)
	case n.Kind == node.NoticeJoin:
		fmt.Fprintf(p.e.stdout, "joined: %s\n", n.Text)
	default:
		fmt.Fprintf(p.e.stdout, "%s\n", n.Text)
	}
}

// membershipLine says what a node of a closed swarm is in it.
func membershipLine(m *membership.Membership) string {
	c, ok := m.Self()
	switch {
	case !ok:
		return fmt.Sprintf("closed swarm of owner %s; redeeming the open invite at the owner's node", m.Owner())
	case c.Exp != 0:
		return fmt.Sprintf("closed swarm of owner %s; member until %s", m.Owner(), c.Expires().UTC().Format(time.RFC3339))
	}
	return fmt.Sprintf("closed swarm of owner %s; member", m.Owner())
}
