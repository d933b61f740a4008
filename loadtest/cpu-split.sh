#!/usr/bin/env bash
# Where the CPU goes per request: perf_analyzer at one concurrency against each target in turn
# (interleaved rounds), and for 3 s in the middle of each run the CPU time (user + system,
# from /proc) of every process on the path: perf_analyzer, tritonserver, its python-backend
# stubs and the front end (infergate, the byte relay or the ceiling server), per request
# answered, beside the host's idle share and the rows per Triton request (Triton's
# statistics). On 2 shared cores a target's throughput is bounded by the sum of these.
#   loadtest/cpu-split.sh [ROUNDS=3] [CONCURRENCY=64] [TARGETS="direct on if1 ceiling"]
# Targets: direct (Triton), relay (examples/tcp_relay.rs), ceiling (examples/kserve_ceiling.rs)
# and infergate variants: on (--batching on), off (--batching off), if1 and if2 (on with
# --batch-max-inflight 1 or 2; unset, add_sub's one instance gives 2), adaptive (2 ms
# window, as compare.sh), t1, t1off and t1adaptive (on, off and adaptive with --grpc-threads
# 1), w<us> (on with a fixed window of <us> microseconds), if1w<us> (the same, one call in
# flight), a<us> (adaptive with that window bound).
# A variant named base-<variant> (base-on, base-off…) runs the build in $BASELINE/infergate, so
# two builds can be compared in the same rounds: BASELINE=<dir> loadtest/cpu-split.sh 3 64 "base-on on".
# Writes loadtest/results/cpu-split-<date>.md and prints it. Listens on 127.0.0.1 only; every
# process it starts stops when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
C="${2:-64}"
TARGETS="${3:-direct on if1 ceiling}"
VENV="$(scripts/install-triton.sh)"
cargo build --release --locked --quiet --bins --example tcp_relay --example kserve_ceiling
export LD_LIBRARY_PATH="$VENV/infergate-libs"
PA="$VENV/bin/perf_analyzer"
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
start_triton

declare -A url front flags
flags[on]="--batching on"
flags[off]="--batching off"
flags[if1]="--batching on --batch-max-inflight 1"
flags[if2]="--batching on --batch-max-inflight 2"
flags[adaptive]="--batching adaptive --batch-max-queue-delay-us 2000"
flags[t1]="--batching on --grpc-threads 1"
flags[t1off]="--batching off --grpc-threads 1"
flags[t1adaptive]="--batching adaptive --batch-max-queue-delay-us 2000 --grpc-threads 1"
url[direct]="127.0.0.1:$tg"
front[direct]=""
for t in $TARGETS; do
  case $t in
    direct) ;;
    relay)
      r=$(port)
      target/release/examples/tcp_relay "127.0.0.1:$r" "127.0.0.1:$tg" >"$work/relay.log" 2>&1 &
      pids+=($!); front[relay]=$!; url[relay]="127.0.0.1:$r" ;;
    ceiling)
      k=$(port)
      target/release/examples/kserve_ceiling "127.0.0.1:$k" >"$work/ceiling.log" 2>&1 &
      pids+=($!); front[ceiling]=$!; url[ceiling]="127.0.0.1:$k" ;;
    *)
      v=${t#base-} bin=target/release/infergate
      [[ $t == base-* ]] && bin="${BASELINE:?base-$v needs BASELINE, a directory holding another build}/infergate"
      # w<us>: batched with a fixed window of that many microseconds; if1w<us>: the same with
      # one call in flight; a<us>: adaptive with that window bound.
      if [[ $v =~ ^(if1)?w([0-9]+)$ ]]; then
        flags[$v]="--batching on --batch-max-queue-delay-us ${BASH_REMATCH[2]}"
        [[ -n ${BASH_REMATCH[1]} ]] && flags[$v]+=" --batch-max-inflight 1"
      elif [[ $v =~ ^a([0-9]+)$ ]]; then
        flags[$v]="--batching adaptive --batch-max-queue-delay-us ${BASH_REMATCH[1]}"
      fi
      [[ -n "${flags[$v]:-}" ]] || { echo "unknown target $t" >&2; exit 2; }
      g=$(port); h=$(port)
      # shellcheck disable=SC2086 # the flags are words
      "$bin" serve --triton-url "http://127.0.0.1:$tg" --grpc-addr "127.0.0.1:$g" \
        --http-addr "127.0.0.1:$h" ${flags[$v]} >"$work/infergate-$t.log" 2>&1 &
      pids+=($!); front[$t]=$!; url[$t]="127.0.0.1:$g"
      for _ in $(seq 1 100); do curl -sf "127.0.0.1:$h/v2/health/ready" >/dev/null && break; sleep 0.1; done ;;
  esac
done
sleep 0.5
triton=$(pgrep -f 'tritonserver ' | head -1)

idle() { awk '/^cpu /{print $5}' /proc/stat; }
add_sub_counts() {
  curl -s "127.0.0.1:$th/v2/models/add_sub/stats" | "$VENV/bin/python" -c \
    'import json,sys; m=json.load(sys.stdin)["model_stats"][0]; print(m["inference_count"], m["inference_stats"]["success"]["count"])'
}

rows="$work/rows.tsv"
for round in $(seq 1 "$ROUNDS"); do
  for t in $TARGETS; do
    "$PA" -m add_sub -i grpc -u "${url[$t]}" --concurrency-range "$C" -p 2000 -s 50 --max-trials 10 \
      >"$work/pa-$t-$round.log" 2>&1 &
    pa=$!
    sleep 3
    stubs=$(pgrep -f triton_python_backend_stub | tr '\n' ' ')
    # shellcheck disable=SC2086 # lists of pids
    { date +%s.%N; ticks $pa; ticks $triton; ticks $stubs; ticks ${front[$t]}; idle; add_sub_counts; } >"$work/before"
    sleep 3
    # shellcheck disable=SC2086
    { date +%s.%N; ticks $pa; ticks $triton; ticks $stubs; ticks ${front[$t]}; idle; add_sub_counts; } >"$work/after"
    wait "$pa" || true
    thr=$(grep -E '^Concurrency' "$work/pa-$t-$round.log" | sed -E 's/.*throughput: ([0-9.]+).*/\1/')
    echo -e "$t\t$round\t${thr:-0}\t$(tr '\n' ' ' <"$work/before")\t$(tr '\n' ' ' <"$work/after")" >>"$rows"
    echo "round $round $t: ${thr:-no stable result} infer/s" >&2
  done
done

mkdir -p loadtest/results
out="loadtest/results/cpu-split-$(date -u +%Y%m%d-%H%M).md"
"$VENV/bin/python" - "$rows" "$ROUNDS" "$C" "$TARGETS" >"$out" <<'PY'
import os, statistics, sys
path, rounds, c, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split()
hz = os.sysconf("SC_CLK_TCK")
label = {"direct": "Triton direct", "on": "infergate batched", "off": "infergate pass-through",
         "if1": "infergate batched, 1 call in flight",
         "if2": "infergate batched, 2 calls in flight", "adaptive": "infergate adaptive",
         "t1": "infergate batched, 1 serving thread", "t1off": "infergate pass-through, 1 serving thread",
         "t1adaptive": "infergate adaptive, 1 serving thread", "relay": "byte relay",
         "ceiling": "ceiling server (no Triton)"}
label.update({f"base-{k}": f"{v} (baseline build)" for k, v in list(label.items())})
cells = {}
for line in open(path):
    t, rnd, thr, before, after = line.rstrip("\n").split("\t")
    b, a = [float(x) for x in before.split()], [float(x) for x in after.split()]
    # fields: time, pa u s, triton u s, stubs u s, front u s, idle, rows, requests
    dt, thr = a[0] - b[0], float(thr)
    d = [a[i] - b[i] for i in range(len(a))]
    us = lambda ticks: ticks / hz / dt * 1e6 / thr if thr else float("nan")
    cells.setdefault(t, []).append({
        "thr": thr, "pa": us(d[1] + d[2]), "triton": us(d[3] + d[4]), "stub": us(d[5] + d[6]),
        "front": us(d[7] + d[8]), "front_user": us(d[7]),
        "idle": d[9] / hz / dt / os.cpu_count() * 100,
        "rows": d[10] / d[11] if d[11] else float("nan"),
    })
print(f"# CPU per request by process, perf_analyzer at c={c} ({rounds} interleaved rounds)\n")
print("Median of the rounds. µs of CPU (user + system) per request answered, over 3 s in the")
print("middle of each run; `front end` is infergate, the relay or the ceiling server (its user")
print("share in brackets); `× direct` is throughput against Triton direct in the same rounds.\n")
print("| target | infer/s | × direct | perf_analyzer | tritonserver | python stubs | front end (user) | all | idle | rows per Triton request |")
print("|---|---|---|---|---|---|---|---|---|---|")
med = lambda t, k: statistics.median(x[k] for x in cells[t])
direct = med("direct", "thr") if "direct" in cells else None
for t in targets:
    if t not in cells:
        continue
    ratio = f"{med(t, 'thr') / direct:.2f}" if direct else "–"
    total = statistics.median(x["pa"] + x["triton"] + x["stub"] + x["front"] for x in cells[t])
    front = "–" if t == "direct" else f"{med(t, 'front'):.1f} ({med(t, 'front_user'):.1f})"
    rows = "–" if t in ("ceiling",) else f"{med(t, 'rows'):.1f}"
    print(f"| {label.get(t, t)} | {med(t, 'thr'):,.0f} | {ratio} | {med(t, 'pa'):.1f} | {med(t, 'triton'):.1f} | "
          f"{med(t, 'stub'):.1f} | {front} | {total:.1f} | {med(t, 'idle'):.1f}% | {rows} |")
print("\nPer round (infer/s):\n")
for t in targets:
    if t in cells:
        print(f"- {label.get(t, t)}: " + ", ".join(f"{x['thr']:,.0f}" for x in cells[t]))
PY
cat "$out"
