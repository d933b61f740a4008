#!/usr/bin/env bash
# Instructions per request of two infergate builds, counted by valgrind's callgrind: unlike
# time, the count does not move with what else runs on this shared host, so a change of a few
# percent in the cost of a call can be read from one run. Each build serves Triton's add_sub
# (in turn, behind the same Triton) under callgrind; infergate-load sends WARMUP requests
# uncounted, then N counted ones at each concurrency. Instruction counts cover infergate's
# own process only (all its threads), not Triton or the load generator.
# Writes loadtest/results/instructions-ab-<date>.md and prints it.
#   BASELINE=<dir holding another build's infergate> [MODE=off] loadtest/instructions-ab.sh [N=2000] [CONCURRENCIES="1 8"]
# Everything listens on 127.0.0.1 only and stops when the script exits.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BASELINE:?set BASELINE to a directory holding another build of infergate}"
N="${1:-2000}"
CONCURRENCIES="${2:-1 8}"
MODE="${MODE:-off}"
WARMUP=300
command -v callgrind_control >/dev/null || { echo "valgrind (callgrind) is needed" >&2; exit 1; }
VENV="$(scripts/install-triton.sh)"
cargo build --release --locked --quiet --bins
export LD_LIBRARY_PATH="$VENV/infergate-libs"
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
start_triton

declare -A bin
bin[baseline]="$BASELINE/infergate"
bin[this]=target/release/infergate
rows=""
for c in $CONCURRENCIES; do
  for b in baseline this; do
    g=$(port); h=$(port)
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg-$b-$c" \
      "${bin[$b]}" serve --triton-url "http://127.0.0.1:$tg" --grpc-addr "127.0.0.1:$g" \
      --http-addr "127.0.0.1:$h" --batching "$MODE" >"$work/$b-$c.log" 2>&1 &
    vp=$!; pids+=("$vp")
    for _ in $(seq 1 600); do curl -sf "127.0.0.1:$h/v2/health/ready" >/dev/null && break; sleep 0.2; done
    load() { timeout 600 target/release/infergate-load --grpc "127.0.0.1:$g" -m add_sub -c "$c" -n "$1" --warmup 0s -q >/dev/null; }
    # Rows per Triton call over the counted requests, from infergate's own metrics: a batched
    # run's count depends on how full its batches were.
    batches() { curl -sf "127.0.0.1:$h/metrics" | awk '/^infergate_batch_rows_(sum|count)/ {printf "%s ", $2} END {print ""}'; }
    load "$WARMUP"
    before=$(batches)
    callgrind_control -i on "$vp" >/dev/null 2>&1
    load "$N"
    callgrind_control -i off "$vp" >/dev/null 2>&1
    after=$(batches)
    callgrind_control -d "$vp" >/dev/null 2>&1
    kill "$vp"; wait "$vp" 2>/dev/null || true
    total=$(cat "$work"/cg-"$b"-"$c".* | awk '/^totals:/ {s += $2} END {print s + 0}')
    per_batch=$(awk -v b="$before" -v a="$after" 'BEGIN { split(b, x, " "); split(a, y, " ");
      if (y[2] - x[2] > 0) printf "%.1f", (y[1] - x[1]) / (y[2] - x[2]); else print "1" }')
    echo "$c $b $total $per_batch" >>"$work/totals"
    echo "c=$c $b: $total instructions" >&2
  done
done

mkdir -p loadtest/results
suffix=""; [[ $MODE != off ]] && suffix="-$MODE"
out="loadtest/results/instructions-ab$suffix-$(date -u +%Y%m%d-%H%M).md"
{
  echo "# Instructions per request (\`--batching $MODE\`): this build against $BASELINE"
  echo
  echo "callgrind counts infergate's instructions (all threads) while infergate-load sends $N"
  echo "requests for add_sub over gRPC, after $WARMUP uncounted ones; one Triton behind both builds."
  echo
  echo "| c | baseline instructions/request | this | this / baseline | rows per Triton call, baseline / this |"
  echo "|---|---|---|---|---|"
  awk -v n="$N" '
    { t[$1, $2] = $3; r[$1, $2] = $4; if (!($1 in seen)) { seen[$1] = 1; order[++k] = $1 } }
    END { for (i = 1; i <= k; i++) { c = order[i]; b = t[c, "baseline"] / n; s = t[c, "this"] / n
      printf "| %s | %.0f | %.0f | %.3f | %s / %s |\n", c, b, s, s / b, r[c, "baseline"], r[c, "this"] } }' "$work/totals"
} >"$out"
cat "$out"
