#!/usr/bin/env bash
# Measures, in one run, direct Triton against infergate in pass-through (--batching off),
# batched (on) and adaptive modes, at concurrency 1, 8 and 64 on add_sub over gRPC, with two
# load generators: perf_analyzer (tritonclient 2.51.0) and infergate-load (this repo). Two
# references run beside them: a byte relay to Triton (examples/tcp_relay.rs, the floor of any
# extra hop) and a KServe server that answers add_sub itself (examples/kserve_ceiling.rs, the
# ceiling of any front end). Targets and tools are interleaved within each round so they see
# the same machine conditions; each cell is the median of the rounds. Writes
# loadtest/results/compare-<date>.md and prints it.
#   loadtest/compare.sh [ROUNDS=3] [CONCURRENCIES="1 8 64"]
# INFERGATE_EXTRA adds flags to every infergate it starts, e.g.
#   INFERGATE_EXTRA="--grpc-threads 1" loadtest/compare.sh 3
# Everything listens on 127.0.0.1 only and stops when the script exits.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
CONCURRENCIES="${2:-1 8 64}"
VENV="$(scripts/install-triton.sh)"
cargo build --release --locked --quiet --bins --example tcp_relay --example kserve_ceiling
export LD_LIBRARY_PATH="$VENV/infergate-libs"
PA="$VENV/bin/perf_analyzer"

# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
start_triton

declare -A target
target[direct]="127.0.0.1:$tg"
for mode in off on adaptive; do
  g=$(port); h=$(port)
  extra=()
  [[ $mode == adaptive ]] && extra=(--batch-max-queue-delay-us 2000)
  # shellcheck disable=SC2206 # the extra flags are words
  extra+=(${INFERGATE_EXTRA:-})
  target_bin=target/release/infergate
  $target_bin serve --triton-url "http://127.0.0.1:$tg" --grpc-addr "127.0.0.1:$g" \
    --http-addr "127.0.0.1:$h" --batching "$mode" "${extra[@]}" >"$work/infergate-$mode.log" 2>&1 &
  pids+=($!)
  target[$mode]="127.0.0.1:$g"
  for _ in $(seq 1 100); do curl -sf "127.0.0.1:$h/v2/health/ready" >/dev/null && break; sleep 0.1; done
done
r=$(port); k=$(port)
target/release/examples/tcp_relay "127.0.0.1:$r" "127.0.0.1:$tg" >"$work/relay.log" 2>&1 &
pids+=($!)
target/release/examples/kserve_ceiling "127.0.0.1:$k" >"$work/ceiling.log" 2>&1 &
pids+=($!)
target[relay]="127.0.0.1:$r"
target[ceiling]="127.0.0.1:$k"
sleep 0.5
names=(direct off on adaptive relay ceiling)

for round in $(seq 1 "$ROUNDS"); do
  for c in $CONCURRENCIES; do
    for n in "${names[@]}"; do
      csv="$work/$n-c$c-r$round.csv"
      timeout 120 "$PA" -m add_sub -i grpc -u "${target[$n]}" --concurrency-range "$c" \
        -p 2000 -s 25 --max-trials 6 -f "$csv" >"$work/$n-c$c-r$round.log" 2>&1 || true
      echo "round $round c=$c $n: $(grep -E '^Concurrency' "$work/$n-c$c-r$round.log" || echo 'no stable result')" >&2
      timeout 60 target/release/infergate-load --grpc "${target[$n]}" -m add_sub -c "$c" \
        -z 6s --warmup 1s -q --json "$work/$n-c$c-r$round.load.json" >/dev/null 2>&1 || true
    done
  done
done

mkdir -p loadtest/results
out="loadtest/results/compare-$(date -u +%Y%m%d-%H%M).md"
"$VENV/bin/python" - "$work" "$ROUNDS" "$CONCURRENCIES" "${INFERGATE_EXTRA:-}" >"$out" <<'PY'
import csv, glob, os, statistics, sys
work, rounds, concs, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
label = {"direct": "Triton direct", "off": "infergate pass-through", "on": "infergate batched", "adaptive": "infergate adaptive",
         "relay": "byte relay to Triton (floor of one hop)", "ceiling": "ceiling server (no Triton)"}
import json
def load_cell(name, c):
    thr, p50, p99 = [], [], []
    for r in range(1, rounds + 1):
        path = os.path.join(work, f"{name}-c{c}-r{r}.load.json")
        if not os.path.exists(path):
            continue
        j = json.load(open(path))
        if j.get("count", 0) == 0 or set(j["statusCodeDistribution"]) != {"OK"}:
            continue
        dist = {d["percentage"]: d["latency"] for d in j["latencyDistribution"]}
        thr.append(j["rps"]); p50.append(dist[50] / 1e6); p99.append(dist[99] / 1e6)
    if not thr:
        return None
    return statistics.median(thr), statistics.median(p50), statistics.median(p99), len(thr)

def cell(name, c):
    thr, p50, p99 = [], [], []
    for r in range(1, rounds + 1):
        path = os.path.join(work, f"{name}-c{c}-r{r}.csv")
        if not os.path.exists(path):
            continue
        rows = list(csv.DictReader(open(path)))
        if rows:
            thr.append(float(rows[0]["Inferences/Second"]))
            p50.append(float(rows[0]["p50 latency"]) / 1000)
            p99.append(float(rows[0]["p99 latency"]) / 1000)
    if not thr:
        return None
    return statistics.median(thr), statistics.median(p50), statistics.median(p99), len(thr)
print(f"add_sub FP32[16]x2, gRPC, median of {rounds} interleaved rounds, all processes on the same 2 cores.\n")
if extra:
    print(f"Every infergate ran with `{extra}`.\n")
for title, fn in [("perf_analyzer (tritonclient 2.51.0)", cell), ("infergate-load (this repo)", load_cell)]:
    print(f"### {title}\n")
    print("| target | c | infer/s | × direct | × ceiling | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for c in concs:
        base, top = fn("direct", c), fn("ceiling", c)
        for name in ["direct", "off", "on", "adaptive", "relay", "ceiling"]:
            v = fn(name, c)
            if v is None:
                print(f"| {label[name]} | {c} | no stable measurement | | | | |")
                continue
            ratio = f"{v[0] / base[0]:.2f}" if base else "–"
            of_top = f"{v[0] / top[0]:.2f}" if top else "–"
            print(f"| {label[name]} | {c} | {v[0]:,.0f} | {ratio} | {of_top} | {v[1]:.2f} | {v[2]:.2f} |")
    print()
print("### The two generators on the same target (direct Triton)\n")
print("| c | perf_analyzer infer/s | infergate-load req/s | difference |")
print("|---|---|---|---|")
for c in concs:
    a, b = cell("direct", c), load_cell("direct", c)
    if a and b:
        print(f"| {c} | {a[0]:,.0f} | {b[0]:,.0f} | {100 * (b[0] - a[0]) / a[0]:+.1f}% |")
PY
cat "$out"
echo "written to $out" >&2
