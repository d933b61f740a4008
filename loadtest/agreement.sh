#!/usr/bin/env bash
# Do infergate-load and perf_analyzer measure the same thing? Both generators, interleaved, on
# the same target (Triton direct, gRPC), where the target rather than the generators' own CPU
# sets the pace:
#   - add_sub at concurrency 1 (one request at a time; the generators mostly wait);
#   - `slow` with delay_ms=5 per execution (the model's time dominates) at concurrency 4 and 8.
# A CPU-bound case (add_sub at c=8) is measured too: there the generators compete with Triton
# for the same 2 cores, and the row shows how much that skews the comparison.
#   loadtest/agreement.sh [ROUNDS]     writes loadtest/results/agreement-<date>.md
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
VENV="$(scripts/install-triton.sh)"
export LD_LIBRARY_PATH="$VENV/infergate-libs:${LD_LIBRARY_PATH:-}"
PA="$VENV/bin/perf_analyzer"
cargo build --release --quiet --bin infergate-load
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
start_triton

# case | model | concurrency | request parameter
cases=("add_sub-c1|add_sub|1|" "slow5-c4|slow|4|delay_ms=5" "slow5-c8|slow|8|delay_ms=5" "add_sub-c8|add_sub|8|")
for round in $(seq 1 "$ROUNDS"); do
  for c in "${cases[@]}"; do
    IFS='|' read -r name model conc param <<<"$c"
    pa_param=(); load_param=()
    if [[ -n "$param" ]]; then
      pa_param=(--request-parameter "${param%%=*}:${param#*=}:int"); load_param=(--param "$param")
    fi
    timeout 120 "$PA" -m "$model" -i grpc -u "127.0.0.1:$tg" --concurrency-range "$conc" \
      -p 3000 -s 25 --max-trials 6 "${pa_param[@]}" -f "$work/$name-r$round.csv" \
      >"$work/$name-r$round.pa.log" 2>&1 || true
    timeout 60 target/release/infergate-load --grpc "127.0.0.1:$tg" -m "$model" -c "$conc" \
      -z 6s --warmup 1s -q "${load_param[@]}" --json "$work/$name-r$round.json" >/dev/null 2>&1 || true
    echo "round $round $name done" >&2
  done
done

mkdir -p loadtest/results
out="loadtest/results/agreement-$(date -u +%Y%m%d-%H%M).md"
"$VENV/bin/python" - "$work" "$ROUNDS" >"$out" <<'PY'
import csv, json, os, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
print("| case | perf_analyzer infer/s | infergate-load req/s | difference | perf_analyzer p50 ms | infergate-load p50 ms |")
print("|---|---|---|---|---|---|")
for name in ["add_sub-c1", "slow5-c4", "slow5-c8", "add_sub-c8"]:
    pa, pa50, ld, ld50 = [], [], [], []
    for r in range(1, rounds + 1):
        p = os.path.join(work, f"{name}-r{r}.csv")
        if os.path.exists(p):
            row = next(csv.DictReader(open(p)))
            pa.append(float(row["Inferences/Second"])); pa50.append(float(row["p50 latency"]) / 1000)
        j = os.path.join(work, f"{name}-r{r}.json")
        if os.path.exists(j):
            s = json.load(open(j))
            if s["count"]:
                ld.append(s["rps"]); ld50.append(next(p["latency"] for p in s["latencyDistribution"] if p["percentage"] == 50) / 1e6)
    if not pa or not ld:
        print(f"| {name} | {len(pa)} runs | {len(ld)} runs | – | – | – |"); continue
    a, b = statistics.median(pa), statistics.median(ld)
    print(f"| {name} | {a:,.0f} | {b:,.0f} | {100 * (b - a) / a:+.1f}% | {statistics.median(pa50):.2f} | {statistics.median(ld50):.2f} |")
print(f"\nMedian of {rounds} interleaved rounds; Triton direct over gRPC on 127.0.0.1.")
PY
cat "$out"
echo "written: $out" >&2
