#!/usr/bin/env bash
# The sync path of two builds against direct Triton, interleaved, in pass-through
# (--batching off) unless MODE=on|adaptive (adaptive with a 2 ms window, as compare.sh): in
# each round and concurrency, infergate-load runs against Triton direct, the baseline build,
# then this build, so the three see the same moment of the shared host. Also counts, with
# strace, the system calls this build and the baseline make per request at c=1.
# Writes loadtest/results/passthrough-ab-<date>.md and prints it.
#   BASELINE=<dir holding another build's infergate> [MODE=off] loadtest/passthrough-ab.sh [ROUNDS=3] [CONCURRENCIES="1 8 64"]
# Everything listens on 127.0.0.1 only and stops when the script exits.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BASELINE:?set BASELINE to a directory holding another build of infergate}"
ROUNDS="${1:-3}"
CONCURRENCIES="${2:-1 8 64}"
MODE="${MODE:-off}"
extra=()
[[ $MODE == adaptive ]] && extra=(--batch-max-queue-delay-us 2000)
VENV="$(scripts/install-triton.sh)"
cargo build --release --locked --quiet
export LD_LIBRARY_PATH="$VENV/infergate-libs"
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
start_triton

declare -A target bin pid
target[direct]="127.0.0.1:$tg"
bin[baseline]="$BASELINE/infergate"
bin[this]=target/release/infergate
for b in baseline this; do
  g=$(port); h=$(port)
  "${bin[$b]}" serve --triton-url "http://127.0.0.1:$tg" --grpc-addr "127.0.0.1:$g" \
    --http-addr "127.0.0.1:$h" --batching "$MODE" "${extra[@]}" >"$work/$b.log" 2>&1 &
  pids+=($!); pid[$b]=$!
  target[$b]="127.0.0.1:$g"
  for _ in $(seq 1 100); do curl -sf "127.0.0.1:$h/v2/health/ready" >/dev/null && break; sleep 0.1; done
done
names=(direct baseline this)

for round in $(seq 1 "$ROUNDS"); do
  for c in $CONCURRENCIES; do
    for n in "${names[@]}"; do
      timeout 60 target/release/infergate-load --grpc "${target[$n]}" -m add_sub -c "$c" \
        -z 6s --warmup 1s -q --json "$work/$n-c$c-r$round.json" >/dev/null 2>&1 || true
      echo "round $round c=$c $n done" >&2
    done
  done
done

# System calls per request at c=1 (strace slows the process; only the counts matter).
syscalls=""
if command -v strace >/dev/null; then
  for b in baseline this; do
    timeout 60 target/release/infergate-load --grpc "${target[$b]}" -m add_sub -c 1 \
      -z 6s -q --json "$work/strace-$b.json" >/dev/null 2>&1 &
    lp=$!
    sleep 1
    timeout 3 strace -f -c -o "$work/strace-$b.txt" -p "${pid[$b]}" >/dev/null 2>&1 || true
    wait "$lp" || true
    counts=$(awk '$NF == "writev" || $NF == "write" || $NF == "recvfrom" || $NF == "futex" || $NF == "epoll_wait" { printf "%s=%s ", $NF, $4 }' "$work/strace-$b.txt")
    syscalls+="$b $counts"$'\n'
  done
fi

mkdir -p loadtest/results
suffix=""; [[ $MODE != off ]] && suffix="-$MODE"
out="loadtest/results/passthrough-ab$suffix-$(date -u +%Y%m%d-%H%M).md"
"$VENV/bin/python" - "$work" "$ROUNDS" "$CONCURRENCIES" "$BASELINE" "$syscalls" "$MODE" >"$out" <<'PY'
import json, os, statistics, sys
work, rounds, concs, baseline, syscalls, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4], sys.argv[5], sys.argv[6]
def one(name, c, r):
    path = os.path.join(work, f"{name}-c{c}-r{r}.json")
    if not os.path.exists(path):
        return None
    j = json.load(open(path))
    if j.get("count", 0) == 0 or set(j["statusCodeDistribution"]) != {"OK"}:
        return None
    d = {x["percentage"]: x["latency"] / 1e6 for x in j["latencyDistribution"]}
    return j["rps"], d[50], d[99]
print(f"# Sync path A/B (`--batching {mode}`): this build against {baseline}\n")
print(f"infergate-load -m add_sub over gRPC, 6 s per cell after 1 s warm-up, `--batching {mode}`, Triton and both")
print("builds on the same 2 cores; in each round and concurrency: direct, baseline, this.\n")
print("| round | c | direct req/s | baseline req/s | this req/s | this/baseline | baseline × direct | this × direct | p50 ms direct / baseline / this | p99 ms direct / baseline / this |")
print("|---|---|---|---|---|---|---|---|---|---|")
ratios = {c: [] for c in concs}
for r in range(1, rounds + 1):
    for c in concs:
        d, b, t = one("direct", c, r), one("baseline", c, r), one("this", c, r)
        if not (d and b and t):
            print(f"| {r} | {c} | (a run failed) |||||||| ")
            continue
        ratios[c].append(t[0] / b[0])
        print(f"| {r} | {c} | {d[0]:,.0f} | {b[0]:,.0f} | {t[0]:,.0f} | {t[0]/b[0]:.2f} | {b[0]/d[0]:.2f} | {t[0]/d[0]:.2f} | "
              f"{d[1]:.3f} / {b[1]:.3f} / {t[1]:.3f} | {d[2]:.2f} / {b[2]:.2f} / {t[2]:.2f} |")
print()
for c in concs:
    if ratios[c]:
        print(f"- c={c}: this/baseline median {statistics.median(ratios[c]):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios[c])})")
if syscalls.strip():
    print("\nSystem calls per request at c=1, from 3 s of `strace -f -c` (two reads per request,")
    print("the caller's and Triton's, so requests = recvfrom / 2):\n")
    for line in syscalls.strip().splitlines():
        name, *kv = line.split()
        n = dict(x.split("=") for x in kv)
        reqs = int(n.get("recvfrom", 0)) / 2
        if reqs:
            per = ", ".join(f"{k} {int(v) / reqs:.2f}" for k, v in sorted(n.items()))
            print(f"- {name}: {per}")
PY
cat "$out"
