#!/usr/bin/env bash
# Balancing over a fleet with one slow server, in one run: three Tritons serve the `slow`
# model (one instance, one call at a time), two of them taking FAST ms a call and the third
# SLOW ms. Two infergates stand in front of all three, one balancing by peak-EWMA with two
# random choices (the default), one by round robin; the same closed-loop gRPC load
# (infergate-load, CONC calls in flight) goes to each in turn, round after round. infergate's
# own batching is off, so each call is one Triton execution. Reported per balancer:
# throughput, p50 and p99, and each Triton's share of the calls (its own statistics).
# Writes loadtest/results/balance-<date>.md and prints it.
#   [NO_BUILD=1] loadtest/balance-bench.sh [ROUNDS=3] [SECONDS=8] [CONC=16] [FAST_MS=2] [SLOW_MS=10]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"; SECS="${2:-8}"; CONC="${3:-16}"; FAST="${4:-2}"; SLOW="${5:-10}"
VENV="$(scripts/install-triton.sh)"
[[ -n ${NO_BUILD:-} ]] || cargo build --release --locked --quiet --bins
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh

urls=(); https=()
for i in 1 2 3; do
  d=$FAST; [[ $i == 3 ]] && d=$SLOW
  mkdir -p "$work/repo$i"
  cp -r triton-models/slow "$work/repo$i/"
  sed -i "s/string_value: \"200\"/string_value: \"$d\"/" "$work/repo$i/slow/config.pbtxt"
  g=$(port); h=$(port); m=$(port)
  TRITON_MODELS="$work/repo$i" INFERGATE_WATCH_PID=$$ scripts/start-triton.sh "$g" "$h" "$m" \
    >"$work/triton$i.log" 2>&1 &
  pids+=($!)
  urls+=("http://127.0.0.1:$g"); https+=("127.0.0.1:$h")
done
for h in "${https[@]}"; do
  for _ in $(seq 1 300); do curl -sf "$h/v2/health/ready" >/dev/null && break; sleep 0.2; done
done
declare -A grpc
for b in peak_ewma round_robin; do
  g=$(port); h=$(port)
  target/release/infergate serve --triton-url "$(IFS=,; echo "${urls[*]}")" --triton-balance "$b" \
    --batching off --grpc-addr "127.0.0.1:$g" --http-addr "127.0.0.1:$h" >"$work/infergate-$b.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do curl -sf "127.0.0.1:$h/v2/health/ready" >/dev/null && break; sleep 0.1; done
  grpc[$b]="127.0.0.1:$g"
done
calls() { # each Triton's executions of `slow` so far
  for h in "${https[@]}"; do
    curl -s "$h/v2/models/slow/stats" | python3 -c 'import json,sys; print(sum(m["execution_count"] for m in json.load(sys.stdin)["model_stats"]))'
  done | xargs
}
load() { # balancer JSON-file
  target/release/infergate-load --grpc "${grpc[$1]}" -m slow -c "$CONC" -q -z "${SECS}s" --warmup 1s --json "$2" >/dev/null
}
load peak_ewma "$work/warm.json"; load round_robin "$work/warm.json"

rows=()
for round in $(seq 1 "$ROUNDS"); do
  for b in peak_ewma round_robin; do
    before=$(calls)
    load "$b" "$work/$b-$round.json"
    after=$(calls)
    rows+=("$(python3 - "$work/$b-$round.json" "$b" "$round" "$before" "$after" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
before = [int(x) for x in sys.argv[4].split()]
after = [int(x) for x in sys.argv[5].split()]
d = [a - b for a, b in zip(after, before)]
share = " / ".join(f"{100 * x / max(1, sum(d)):.0f}" for x in d)
pct = {p["percentage"]: p["latency"] / 1e6 for p in r["latencyDistribution"]}
errors = sum(r["errorDistribution"].values())
print(f"| {sys.argv[3]} | {sys.argv[2]} | {r['count']} | {errors} | {r['rps']:.1f} | "
      f"{pct.get(50, 0):.2f} | {pct.get(99, 0):.2f} | {share} |")
PY
)")
  done
done

out="loadtest/results/balance-$(date -u +%Y%m%d-%H%M).md"
{
  echo "# Balancing with one slow server: peak-EWMA against round robin ($(date -u +%Y-%m-%d\ %H:%M) UTC)"
  echo
  echo "Three Tritons serve \`slow\` (one instance, one execution at a time): two take ${FAST} ms a call, the"
  echo "third ${SLOW} ms. Closed loop, ${CONC} calls in flight, ${SECS} s per cell after 1 s of warm-up;"
  echo "infergate's batching off. Host: $(nproc) cores, shared; release build; Triton CPU build."
  echo
  echo "| round | balancer | requests | errors | requests/s | p50 ms | p99 ms | share per Triton % (fast / fast / slow) |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$out"
cat "$out"
