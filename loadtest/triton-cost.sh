#!/usr/bin/env bash
# What one call costs Triton itself, by rows per call: infergate-load sends add_sub requests of
# B rows straight to Triton (no infergate) at a few concurrencies, and the CPU time (user +
# system, from /proc) of tritonserver and its python-backend stub over each run is divided by
# the calls answered. This is the fact under front-end batching (a call's cost barely moves
# with its rows) and the bound on what batching can save on a host where Triton shares the
# CPUs with everything else (BENCHMARKS.md).
#   loadtest/triton-cost.sh [SECONDS=5] [CONCURRENCIES="1 4"] [ROWS="1 8 16 32 64"]
# Writes loadtest/results/triton-cost-<date>.md and prints it. Listens on 127.0.0.1 only; the
# Triton it starts stops when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN="${1:-5}"
CONCURRENCIES="${2:-1 4}"
ROWS="${3:-1 8 16 32 64}"
VENV="$(scripts/install-triton.sh)"
cargo build --release --locked --quiet --bin infergate-load
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
start_triton
triton=$(pgrep -f 'tritonserver ' | head -1)

# User + system clock ticks of the given processes (lib.sh's `ticks` gives the two apart).
cpu_ticks() {
  local u s
  read -r u s <<<"$(ticks "$@")"
  echo $((u + s))
}

rows_file="$work/rows.tsv"
for c in $CONCURRENCIES; do
  for b in $ROWS; do
    # Warm-up, so the stub and both connections are up before the measured run.
    # Bounded runs, so the script stops by itself even if Triton hangs (`timeout`).
    timeout 60 target/release/infergate-load --grpc "127.0.0.1:$tg" -m add_sub -b "$b" -c "$c" -z 1s \
      --warmup 0s -q >/dev/null
    stubs=$(pgrep -f triton_python_backend_stub | tr '\n' ' ')
    t0=$(cpu_ticks "$triton")
    # shellcheck disable=SC2086 # a list of pids
    s0=$(cpu_ticks $stubs)
    timeout $((SECONDS_PER_RUN + 60)) target/release/infergate-load --grpc "127.0.0.1:$tg" \
      -m add_sub -b "$b" -c "$c" -z "${SECONDS_PER_RUN}s" --warmup 0s -q --json "$work/run.json" >/dev/null
    t1=$(cpu_ticks "$triton")
    # shellcheck disable=SC2086
    s1=$(cpu_ticks $stubs)
    echo -e "$c\t$b\t$((t1 - t0))\t$((s1 - s0))\t$(tr -d '\n' <"$work/run.json")" >>"$rows_file"
    echo "c=$c rows=$b done" >&2
  done
done

mkdir -p loadtest/results
out="loadtest/results/triton-cost-$(date -u +%Y%m%d-%H%M).md"
"$VENV/bin/python" - "$rows_file" "$(getconf CLK_TCK)" >"$out" <<'PY'
import json, sys
path, hz = sys.argv[1], int(sys.argv[2])
print("# Triton's own CPU per call, by rows per call (add_sub, gRPC, infergate-load direct)\n")
print("µs of CPU (user + system) of tritonserver and of its python-backend stub per call answered,")
print("over the whole measured run; `per row` is both together divided by the rows of a call.\n")
print("| c | rows per call | calls/s | rows/s | tritonserver µs/call | stub µs/call | both µs/call | µs per row |")
print("|---|---|---|---|---|---|---|---|")
for line in open(path):
    c, b, t, s, j = line.rstrip("\n").split("\t", 4)
    j = json.loads(j)
    calls, b = j["count"], int(b)
    if not calls:
        print(f"| {c} | {b} | no calls answered | | | | | |")
        continue
    tc, sc = int(t) / hz * 1e6 / calls, int(s) / hz * 1e6 / calls
    print(f"| {c} | {b} | {j['rps']:,.0f} | {j['rps'] * b:,.0f} | {tc:.0f} | {sc:.0f} | {tc + sc:.0f} | {(tc + sc) / b:.1f} |")
PY
cat "$out"
