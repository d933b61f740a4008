#!/usr/bin/env bash
# The sync path of two builds against direct Triton, interleaved, in pass-through
# (--batching off) unless MODE=on|adaptive (adaptive with a 2 ms window, as compare.sh): in
# each round and concurrency, infergate-load runs against Triton direct, the baseline build,
# this build, then a byte relay (examples/tcp_relay.rs: one extra hop and no parsing, the
# floor of any front end), so all four see the same moment of the shared host. Each build's
# CPU time per request (user + system, from /proc) is recorded beside its throughput. Also
# counts, with strace, the system calls this build and the baseline make per request at c=1.
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
cargo build --release --locked --quiet --bins --example tcp_relay
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
r=$(port)
target/release/examples/tcp_relay "127.0.0.1:$r" "127.0.0.1:$tg" >"$work/relay.log" 2>&1 &
pids+=($!); pid[relay]=$!
target[relay]="127.0.0.1:$r"
names=(direct baseline this relay)
# CPU ticks (user + system) a process has used so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

for round in $(seq 1 "$ROUNDS"); do
  for c in $CONCURRENCIES; do
    for n in "${names[@]}"; do
      p="${pid[$n]:-}"
      before=$([[ -n $p ]] && ticks "$p" || echo 0)
      timeout 60 target/release/infergate-load --grpc "${target[$n]}" -m add_sub -c "$c" \
        -z 6s --warmup 1s -q --json "$work/$n-c$c-r$round.json" >/dev/null 2>&1 || true
      after=$([[ -n $p ]] && ticks "$p" || echo 0)
      echo $((after - before)) >"$work/$n-c$c-r$round.ticks"
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
"$VENV/bin/python" - "$work" "$ROUNDS" "$CONCURRENCIES" "$BASELINE" "$syscalls" "$MODE" "$(getconf CLK_TCK)" >"$out" <<'PY'
import json, os, statistics, sys
work, rounds, concs, baseline, syscalls, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4], sys.argv[5], sys.argv[6]
tick = int(sys.argv[7])
def one(name, c, r):
    path = os.path.join(work, f"{name}-c{c}-r{r}.json")
    if not os.path.exists(path):
        return None
    j = json.load(open(path))
    if j.get("count", 0) == 0 or set(j["statusCodeDistribution"]) != {"OK"}:
        return None
    d = {x["percentage"]: x["latency"] / 1e6 for x in j["latencyDistribution"]}
    # CPU per request: the ticks cover the 1 s warm-up too, at about the measured rate.
    ticks = int(open(os.path.join(work, f"{name}-c{c}-r{r}.ticks")).read())
    seconds = j["total"] / 1e9
    cpu = ticks / tick * 1e6 / (j["rps"] * (seconds + 1)) if ticks else 0.0
    return j["rps"], d[50], d[99], cpu
print(f"# Sync path A/B (`--batching {mode}`): this build against {baseline}\n")
print(f"infergate-load -m add_sub over gRPC, 6 s per cell after 1 s warm-up, `--batching {mode}`, Triton and both")
print("builds on the same 2 cores; in each round and concurrency: direct, baseline, this, relay.\n")
print("The relay (examples/tcp_relay.rs) copies bytes to Triton with no parsing: its ratio is the")
print("floor of one extra hop on this host. CPU is µs of user + system time per request.\n")
print("| round | c | direct req/s | baseline req/s | this req/s | relay req/s | this/baseline | × direct: baseline / this / relay | CPU µs/req baseline / this / relay | p50 ms direct / baseline / this / relay | p99 ms direct / baseline / this / relay |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
ratios = {c: [] for c in concs}
vs_direct = {c: {"baseline": [], "this": [], "relay": []} for c in concs}
cpus = {c: {"baseline": [], "this": [], "relay": []} for c in concs}
added = {"baseline": [], "this": [], "relay": []}
for r in range(1, rounds + 1):
    for c in concs:
        d, b, t, l = (one(n, c, r) for n in ("direct", "baseline", "this", "relay"))
        if not (d and b and t and l):
            print(f"| {r} | {c} | (a run failed) ||||||||| ")
            continue
        ratios[c].append(t[0] / b[0])
        for n, v in (("baseline", b), ("this", t), ("relay", l)):
            vs_direct[c][n].append(v[0] / d[0])
            cpus[c][n].append(v[3])
            if c == "1":
                added[n].append(v[1] - d[1])
        print(f"| {r} | {c} | {d[0]:,.0f} | {b[0]:,.0f} | {t[0]:,.0f} | {l[0]:,.0f} | {t[0]/b[0]:.2f} | "
              f"{b[0]/d[0]:.2f} / {t[0]/d[0]:.2f} / {l[0]/d[0]:.2f} | {b[3]:.0f} / {t[3]:.0f} / {l[3]:.0f} | "
              f"{d[1]:.3f} / {b[1]:.3f} / {t[1]:.3f} / {l[1]:.3f} | {d[2]:.2f} / {b[2]:.2f} / {t[2]:.2f} / {l[2]:.2f} |")
print()
med = lambda xs: statistics.median(xs) if xs else float("nan")
for c in concs:
    if ratios[c]:
        v, u = vs_direct[c], cpus[c]
        print(f"- c={c}: this/baseline median {med(ratios[c]):.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios[c])}); "
              f"× direct, median: baseline {med(v['baseline']):.2f}, this {med(v['this']):.2f}, relay {med(v['relay']):.2f}; "
              f"CPU µs/req: baseline {med(u['baseline']):.0f}, this {med(u['this']):.0f}, relay {med(u['relay']):.0f}")
if added["this"]:
    print(f"- added p50 at c=1, median: baseline +{med(added['baseline']):.3f} ms, this +{med(added['this']):.3f} ms, relay +{med(added['relay']):.3f} ms")
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
