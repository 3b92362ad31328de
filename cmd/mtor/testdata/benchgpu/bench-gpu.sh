#!/usr/bin/env bash
# make bench-gpu MODEL=/path/to/model: energy figures of mtor on an NVIDIA GPU.
#
# Serves a local ~1B-parameter causal LM (a transformers directory, e.g.
# TinyLlama-1.1B-Chat or Llama-3.2-1B-Instruct, already on disk: no
# internet is used) on the GPU with a tiny OpenAI-compatible server
# (openai_server.py), puts one mtor node in front of it (--backend openai),
# asks it through `mtor query --json` (the one client sure to be there: no
# curl needed), and records:
#   - idle and busy GPU power (nvidia-smi power.draw, sampled every 200 ms);
#   - per query, mtor's energy_mj (as `mtor query --json` reports it) against
#     NVML's total-energy counter read independently (nvml_energy.py, mJ)
#     just before and after the query,
#     sequentially and with 8 queries at once;
#   - joules per completion token at concurrency 1 and 8.
# Without an NVIDIA GPU it says so and exits 0 (skipped); without a model
# directory it fails with a usage line (exit 2).
#
# BENCH_GPU_RANDOM_WEIGHTS=1: where no model's weights can be brought to
# the machine, MODEL_DIR needs only a config.json; the model of that shape
# gets random weights and a stand-in byte tokenizer. Its answers are noise,
# but each token costs the GPU what the real model's would (the same
# layers and sizes), and every answer is max_tokens long.
# testdata/benchgpu/tinyllama-shape is TinyLlama-1.1B's shape.
set -euo pipefail

usage() { echo "usage: $0 MODEL_DIR [MTOR_BINARY]  (make bench-gpu MODEL=/path/to/model, or RANDOM_WEIGHTS=1)" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
model=${1:-}
bin=${2:-./bin/mtor}
SEQ=${BENCH_GPU_SEQ:-10}         # sequential queries
CONC=${BENCH_GPU_CONC:-8}        # concurrent queries per round
ROUNDS=${BENCH_GPU_ROUNDS:-3}    # concurrent rounds
MAXTOK=${BENCH_GPU_MAX_TOKENS:-128}
RANDOM_WEIGHTS=${BENCH_GPU_RANDOM_WEIGHTS:-0}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
	echo "bench-gpu: skipped: no NVIDIA GPU here (nvidia-smi missing or finds no GPU)"
	exit 0
fi
[ -n "$model" ] || { echo "bench-gpu: no model directory given" >&2; usage; }
[ -d "$model" ] && [ -f "$model/config.json" ] || { echo "bench-gpu: $model is not a transformers model directory (no config.json)" >&2; usage; }
[ -x "$bin" ] || { echo "bench-gpu: no mtor binary at $bin (make build)" >&2; exit 1; }
python3 -c 'import torch, transformers; assert torch.cuda.is_available(), "torch sees no CUDA GPU"' ||
	{ echo "bench-gpu: python3 needs torch (with CUDA) and transformers" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# calc EXPR: arithmetic on decimals (no bc on every machine).
calc() { awk "BEGIN {printf \"%.3f\", $1}"; }
# power_sample SECONDS FILE: power.draw (W) every 200 ms for SECONDS.
power_sample() { timeout "$1" nvidia-smi --query-gpu=power.draw --format=csv,noheader,nounits -i 0 -lms 200 >"$2" 2>/dev/null || true; }
mean() { awk '{s+=$1; n++} END {if (n) printf "%.1f", s/n; else print "?"}' "$1"; }

# NVML's total-energy counter of GPU 0, read apart from mtor's own NVML by
# nvml_energy.py, which answers a line with a line: no process starts
# inside a query's window.
coproc METER { python3 -u "$here/nvml_energy.py" 0; }
pids+=("$METER_PID")
read -r meter <&"${METER[0]}" || meter="error: nvml_energy.py exited"
[ "$meter" = ready ] || { echo "bench-gpu: cannot read GPU 0's total-energy counter: ${meter#error: }" >&2; exit 1; }
# energy: the counter now, in mJ, into E.
energy() {
	{ echo >&"${METER[1]}" && read -r E <&"${METER[0]}"; } 2>/dev/null || { echo "bench-gpu: the energy reader (nvml_energy.py) stopped" >&2; exit 1; }
	case $E in '' | *[!0-9]*) echo "bench-gpu: energy counter: $E" >&2; exit 1 ;; esac
}

port=$(free_port)
server_args=("$model" "$port")
[ "$RANDOM_WEIGHTS" = 1 ] && server_args+=(--random-weights)
echo "bench-gpu: loading $model on the GPU"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} python3 "$here/openai_server.py" "${server_args[@]}" >"$work/server.log" 2>&1 &
server=$!
pids+=($server)
# The server prints "serving on" once it listens, after the model is loaded.
for _ in $(seq 1200); do grep -q '^serving on ' "$work/server.log" && break; kill -0 "$server" 2>/dev/null || break; sleep 0.5; done
grep -q '^serving on ' "$work/server.log" || { echo "bench-gpu: model server did not start:" >&2; cat "$work/server.log" >&2; exit 1; }
grep -m1 "^loaded " "$work/server.log"

api=127.0.0.1:$(free_port)
"$bin" node --data-dir "$work/node" --listen /ip4/127.0.0.1/tcp/0 --api "$api" --no-mdns \
	--backend "openai=http://127.0.0.1:$port" >"$work/node.log" 2>&1 &
pids+=($!)
# The table is read whole before it is searched: with pipefail, `| grep -q`
# fails the test whenever grep exits before mtor has written its last line
# (SIGPIPE), at random.
serves() { [[ $("$bin" peers --api "$api" 2>/dev/null || true) == *bench-model* ]]; }
for _ in $(seq 120); do serves && break; sleep 0.5; done
serves || { echo "bench-gpu: mtor node did not serve the model:" >&2; cat "$work/node.log" >&2; exit 1; }

# fail: the logs' ends after a failed query, then exit 1.
fail() {
	echo "bench-gpu: node log:" >&2; tail -20 "$work/node.log" >&2
	echo "bench-gpu: model server log:" >&2; tail -20 "$work/server.log" >&2
	exit 1
}

# query N FILE: one chat query through the node, its JSON into FILE.
# parse FILE: prints "energy_mj completion_tokens". Parsing is kept out of
# the counter's window: a python3 start-up there would be counted as the
# query's energy.
query() {
	"$bin" query --api "$api" --json --model bench-model --max-tokens "$MAXTOK" --timeout 10m \
		"Write a short story about a lighthouse keeper, number $1." >"$2"
}
parse() {
	python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r.get("energy_mj",0), r["usage"]["completion_tokens"])' "$1"
}

query 0 "$work/warm.json" || { echo "bench-gpu: the warm-up query failed" >&2; fail; }
answer=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["text"][:60])' "$work/warm.json")
echo "bench-gpu: idle power for 10 s"
sleep 2
energy; ea=$E; ta=$(date +%s.%N)
power_sample 10 "$work/idle.txt"
energy; eb=$E; tb=$(date +%s.%N)
idle_w=$(mean "$work/idle.txt")
# The counter's unit, from the idle window itself: NVML counts mJ, so
# delta / (power × time) is ~1000; a reader giving joules would show ~1.
scale=$(awk -v d="$(calc "$eb - $ea")" -v w="$idle_w" -v t="$(calc "$tb - $ta")" 'BEGIN {
	r = (w > 0 && t > 0) ? d / (w * t) : 0
	if (r > 100 && r < 10000) print 1; else if (r > 0.1 && r < 10) print 1000; else print "?" }')
[ "$scale" != "?" ] || { echo "bench-gpu: cannot tell the energy counter's unit (delta $ea→$eb over ${idle_w} W idle)" >&2; exit 1; }

echo "bench-gpu: $SEQ sequential queries"
: >"$work/seq.txt"
for i in $(seq "$SEQ"); do
	energy; e0=$E; t0=$(date +%s.%N)
	query "$i" "$work/q.json" || { echo "bench-gpu: query $i failed" >&2; fail; }
	t1=$(date +%s.%N); energy; e1=$E
	echo "1 $(parse "$work/q.json") $(calc "$e0 * $scale") $(calc "$e1 * $scale") $t0 $t1" >>"$work/seq.txt"
done

echo "bench-gpu: $ROUNDS rounds of $CONC concurrent queries"
# timeout itself in the background, so that killing it stops nvidia-smi.
timeout $((ROUNDS * 120)) nvidia-smi --query-gpu=power.draw --format=csv,noheader,nounits -i 0 -lms 200 >"$work/busy.txt" 2>/dev/null &
sampler=$!
: >"$work/conc.txt"
for r in $(seq "$ROUNDS"); do
	energy; e0=$E; t0=$(date +%s.%N)
	qpids=()
	for i in $(seq "$CONC"); do query "$r$i" "$work/c.$i.json" & qpids+=($!); done
	for p in "${qpids[@]}"; do wait "$p" || { echo "bench-gpu: a concurrent query failed" >&2; fail; }; done
	t1=$(date +%s.%N); energy; e1=$E
	for i in $(seq "$CONC"); do parse "$work/c.$i.json"; done |
		awk -v q="$CONC" -v e0="$e0" -v e1="$e1" -v k="$scale" -v t0="$t0" -v t1="$t1" \
			'{m+=$1; t+=$2} END {printf "%d %d %d %.0f %.0f %s %s\n", q, m, t, e0*k, e1*k, t0, t1}' >>"$work/conc.txt"
	rm -f "$work"/c.*.json
done
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
busy_w=$(mean "$work/busy.txt")
# What the node itself announces to the swarm after these queries.
"$bin" peers --api "$api" --json >"$work/peers.json"
view=$(python3 -c '
import json, sys
me = next(p for p in json.load(open(sys.argv[1])) if p["self"])
m = next((m for m in me["models"] if m["name"] == "bench-model"), {})
g = (me.get("gpus") or [{}])[0]
gib = 1 << 30
print("bench-model %.1f tokens/s, %.3f J/token, TTFT p50 %d ms; GPU %s, VRAM %.1f of %.1f GiB used, %d %% busy, %.0f W" % (
    m.get("tokens_per_sec", 0), m.get("joules_per_token", 0), m.get("p50_ttft_ms", 0), g.get("name", "none"),
    (g.get("vram_total_bytes", 0) - g.get("vram_free_bytes", 0)) / gib, g.get("vram_total_bytes", 0) / gib,
    g.get("util_percent", 0), g.get("power_mw", 0) / 1000))' "$work/peers.json")

# Each line, one counter window: queries mtor_mJ tokens nvml_before
# nvml_after start end (s). Tokens per second are over the windows' time.
report() {
	awk -v label="$1" '{q+=$1; m+=$2; t+=$3; n+=($5-$4); s+=($7-$6)} END {
		printf "| %s | %d (%d windows) | %d | %.0f | %.0f | %.2f | %.3f | %.3f | %.1f | %.1f |\n", label, q, NR, t, m, n, (n>0 ? m/n : 0),
			(t>0 ? m/t/1000 : 0), (t>0 ? n/t/1000 : 0), (q>0 ? n/q/1000 : 0), (s>0 ? t/s : 0)}' "$2"
}
echo
weights=""
[ "$RANDOM_WEIGHTS" = 1 ] && weights=" (random weights, stand-in tokenizer)"
echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader -i 0); model: $model$weights; max_tokens $MAXTOK"
echo "model server: $(grep -m1 "^loaded " "$work/server.log")"
echo "warm-up answer: $answer"
echo "idle power: $idle_w W; busy power (concurrency $CONC): $busy_w W"
echo "mtor node: $(grep -m1 '^gpu: ' "$work/node.log" || echo 'gpu: (no line)')"
echo "mtor announces: $view"
echo
echo "| run | queries (counter windows) | completion tokens | mtor energy_mj, sum | NVML delta around them, mJ | mtor / NVML | J/token (mtor) | J/token (NVML) | J/query (NVML) | tokens/s |"
echo "|---|---|---|---|---|---|---|---|---|---|"
report "concurrency 1" "$work/seq.txt"
report "concurrency $CONC" "$work/conc.txt"
# mtor's column is only worth reading when its in-process NVML measured.
if awk '{m+=$2} END {exit !(m == 0)}' "$work/seq.txt" "$work/conc.txt"; then
	echo
	echo "bench-gpu: mtor reported no energy (energy_mj 0 on every query): its NVML found no energy counter; see the gpu line above"
fi
