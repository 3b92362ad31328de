#!/usr/bin/env bash
# make demo: a whole swarm on this machine's loopback interface.
#
#   - a bootstrap node with the control API (127.0.0.1:5050) and the bridge
#     (web page and OpenAI-compatible API on 127.0.0.1:5080); it has no
#     --backend, so it serves whatever local model server it detects
#     (Ollama on 11434, an OpenAI-compatible server on 8080) and otherwise
#     only routes;
#   - two workers with the built-in demo backend, joined through the
#     bootstrap's join line.
#
# A port already taken (another node, another program) is replaced by a
# free one, and the URLs printed are those in use. Override the ports with
# MTOR_DEMO_API / MTOR_DEMO_BRIDGE (then a taken port is an error).
# Ctrl-C stops every node, whatever happened to this script's output
# (`make demo | tee log` loses its reader on Ctrl-C).
set -euo pipefail

MTOR=${1:-./bin/mtor}
WAIT_S=${MTOR_DEMO_WAIT:-60}
# GRACE_S: on Ctrl-C, what a node gives the answers in flight before it
# ends them with an error its clients read (a node's default is 30 s, long
# for a demo). The script waits that long and a little more (a bridge
# may overrun by 2 s to write those errors) before it kills a node.
GRACE_S=5

[ -x "$MTOR" ] || { echo "demo: $MTOR not found; run 'make build' first" >&2; exit 1; }

# taken HOST:PORT: something accepts connections there.
taken() {
	local host=${1%:*} port=${1##*:}
	[ "$port" != 0 ] && (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# pick VAR DEFAULT WHAT: the address to use; an explicit one is kept, a
# taken default gives way to a free port that the node chooses.
pick() {
	local var=$1 def=$2 what=$3 val
	val=${!var:-}
	if [ -n "$val" ]; then
		echo "$val"
	elif taken "$def"; then
		echo "demo: $def is taken; the $what gets a free port" >&2
		echo "${def%:*}:0"
	else
		echo "$def"
	fi
}
API=$(pick MTOR_DEMO_API 127.0.0.1:5050 "control API")
BRIDGE=$(pick MTOR_DEMO_BRIDGE 127.0.0.1:5080 bridge)

# Job control puts every node in its own process group: Ctrl-C reaches only
# this script, which then stops each node once, gracefully.
set -m

tmp=$(mktemp -d "${TMPDIR:-/tmp}/mtor-demo.XXXXXX")
pids=()

# say: a line for the user that never stops the script: once the reader of
# our output is gone (Ctrl-C on `make demo | tee log`), writes fail, and
# the nodes must still be stopped.
say() { printf '%s\n' "$*" 2>/dev/null || true; }

cleanup() {
	# First of all: nothing may abort the cleanup, neither a failed write
	# (SIGPIPE, EPIPE under set -e) nor another Ctrl-C.
	set +e
	trap '' PIPE INT TERM HUP
	trap - EXIT
	local pid
	for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
	say ""
	say "demo: stopping the swarm (answers in flight get ${GRACE_S}s)"
	for pid in "${pids[@]}"; do
		# A node gets its grace period; then it is killed.
		for _ in $(seq $(((GRACE_S + 5) * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	rm -rf "$tmp"
}
trap cleanup EXIT
# Ctrl-C is how the demo ends: a clean exit, not an error.
trap 'exit 0' INT TERM HUP

# start NAME ARGS...: one node with its own data dir and log, on loopback
# only, with random ports.
start() {
	local name=$1
	shift
	"$MTOR" node --data-dir "$tmp/$name" --no-mdns \
		--listen /ip4/127.0.0.1/tcp/0 --listen /ip4/127.0.0.1/udp/0/quic-v1 \
		--announce-interval 2s --grace "${GRACE_S}s" "$@" >"$tmp/$name.log" 2>&1 &
	pids+=($!)
}

# value NAME KEY: the first "KEY: value" line the node printed.
value() { sed -n "/^$2: /{s///p;q;}" "$tmp/$1.log"; }

# join_line NAME: wait for the node's "join:" line (printed once it is up).
join_line() {
	local name=$1 pid=${pids[-1]}
	for _ in $(seq $((WAIT_S * 10))); do
		if grep -q '^join: ' "$tmp/$name.log"; then
			value "$name" join
			return 0
		fi
		if ! kill -0 "$pid" 2>/dev/null; then
			echo "demo: node $name exited:" >&2
			cat "$tmp/$name.log" >&2
			return 1
		fi
		sleep 0.1
	done
	echo "demo: node $name printed no join line within ${WAIT_S}s:" >&2
	cat "$tmp/$name.log" >&2
	return 1
}

start bootstrap --api "$API" --bridge "$BRIDGE"
JOIN=$(join_line bootstrap)
# The addresses in use, port 0 resolved.
API=$(value bootstrap api)
WEB=$(value bootstrap bridge)
WEB=${WEB%/}
grep -E '^(peer|detected|backend|backends|api|bridge):' "$tmp/bootstrap.log" | sed 's/^/bootstrap  /'

for w in worker1 worker2; do
	start "$w" --api 127.0.0.1:0 --backend demo --join "$JOIN"
	join_line "$w" >/dev/null
	grep -E '^(peer|backend):' "$tmp/$w.log" | sed "s/^/$w    /"
done

# Wait until the bootstrap's peer table lists both demo workers.
say ""
say "demo: waiting for the workers' announcements..."
seen=0
for _ in $(seq $((WAIT_S * 5))); do
	seen=$("$MTOR" peers --api "$API" --json 2>/dev/null | grep -c '"name": "demo"' || true)
	[ "$seen" -ge 2 ] && break
	sleep 0.2
done
if [ "$seen" -lt 2 ]; then
	echo "demo: the workers did not appear within ${WAIT_S}s; logs:" >&2
	tail -n 20 "$tmp"/*.log >&2
	exit 1
fi

say ""
"$MTOR" peers --api "$API" || true
say ""
say "web page:     $WEB/"
say "OpenAI API:   $WEB/v1  (model \"demo\")"
say "control API:  $API"
say "join token:   $JOIN"
say ""
say "try:"
say "  $MTOR query --api $API \"hello swarm\""
say "  $MTOR query --join $JOIN --json \"hello from outside\""
say "  $MTOR peers --api $API"
say ""
say "demo: running (logs in $tmp); Ctrl-C stops all nodes"
wait
