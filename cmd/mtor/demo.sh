#!/usr/bin/env bash
# make demo: a whole swarm on this machine's loopback interface.
#
#   - a bootstrap node with the control API (127.0.0.1:5050) and the bridge
#     (web page and OpenAI-compatible API on 127.0.0.1:8080); it has no
#     --backend, so it serves whatever local model server it detects
#     (Ollama, OpenAI-compatible) and otherwise only routes;
#   - two workers with the built-in demo backend, joined through the
#     bootstrap's join line.
#
# Ctrl-C stops them all. Override ports with MTOR_DEMO_API / MTOR_DEMO_BRIDGE.
set -euo pipefail

MTOR=${1:-./bin/mtor}
API=${MTOR_DEMO_API:-127.0.0.1:5050}
BRIDGE=${MTOR_DEMO_BRIDGE:-127.0.0.1:8080}
WAIT_S=${MTOR_DEMO_WAIT:-60}

[ -x "$MTOR" ] || { echo "demo: $MTOR not found; run 'make build' first" >&2; exit 1; }

# Job control puts every node in its own process group: Ctrl-C reaches only
# this script, which then stops each node once, gracefully.
set -m

tmp=$(mktemp -d "${TMPDIR:-/tmp}/mtor-demo.XXXXXX")
pids=()

cleanup() {
	trap - EXIT INT TERM
	echo
	echo "demo: stopping the swarm"
	for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT
# Ctrl-C is how the demo ends: a clean exit, not an error.
trap 'exit 0' INT TERM

# start NAME ARGS...: one node with its own data dir and log, on loopback
# only, with random ports.
start() {
	local name=$1
	shift
	"$MTOR" node --data-dir "$tmp/$name" --no-mdns \
		--listen /ip4/127.0.0.1/tcp/0 --listen /ip4/127.0.0.1/udp/0/quic-v1 \
		--announce-interval 2s "$@" >"$tmp/$name.log" 2>&1 &
	pids+=($!)
}

# join_line NAME: wait for the node's "join:" line (printed once it is up).
join_line() {
	local name=$1 pid=${pids[-1]}
	for _ in $(seq $((WAIT_S * 10))); do
		if grep -q '^join: ' "$tmp/$name.log"; then
			sed -n 's/^join: //p' "$tmp/$name.log" | head -n 1
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
grep -E '^(peer|detected|backend|backends|api|bridge):' "$tmp/bootstrap.log" | sed 's/^/bootstrap  /'

for w in worker1 worker2; do
	start "$w" --api 127.0.0.1:0 --backend demo --join "$JOIN"
	join_line "$w" >/dev/null
	grep -E '^(peer|backend):' "$tmp/$w.log" | sed "s/^/$w    /"
done

# Wait until the bootstrap's peer table lists both demo workers.
echo
echo "demo: waiting for the workers' announcements..."
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

echo
"$MTOR" peers --api "$API"
echo
echo "web page:     http://$BRIDGE/"
echo "OpenAI API:   http://$BRIDGE/v1  (model \"demo\")"
echo "join token:   $JOIN"
echo
echo "try:"
echo "  $MTOR query --api $API \"hello swarm\""
echo "  $MTOR query --join $JOIN --json \"hello from outside\""
echo "  $MTOR peers --api $API"
echo
echo "demo: running (logs in $tmp); Ctrl-C stops all nodes"
wait
