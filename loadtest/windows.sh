#!/usr/bin/env bash
# Batching windows in one interleaved run: infergate with batching off, with its default
# settings, and with fixed windows of 100 µs, 300 µs and 1 ms (`--batching on
# --batch-max-queue-delay-us W`), on add_sub (no Triton-side window) and add_sub_delay
# (Triton's own max_queue_delay_microseconds: 100), over gRPC and HTTP (binary tensor
# extension), at each concurrency, beside direct Triton, a byte relay in front of Triton's port
# of that protocol (examples/tcp_relay.rs) and, over gRPC, the ceiling server
# (examples/kserve_ceiling.rs). Load: infergate-load, closed loop. Each cell is the median of
# the rounds. Writes loadtest/results/windows-<date>.md and prints it.
#   loadtest/windows.sh [ROUNDS=2] [CONCURRENCIES="1 8 64"] [SECONDS=3]
# Everything listens on 127.0.0.1 only and stops when the script exits.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-2}"
CONCURRENCIES="${2:-1 8 64}"
SECONDS_PER_CELL="${3:-3}"
VENV="$(scripts/install-triton.sh)"
cargo build --release --locked --quiet --bins --example tcp_relay --example kserve_ceiling

# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
start_triton

declare -A grpc http
grpc[direct]="127.0.0.1:$tg"
http[direct]="127.0.0.1:$th"
variants=(off default w100 w300 w1000)
for v in "${variants[@]}"; do
  g=$(port); h=$(port)
  case $v in
    off) flags=(--batching off) ;;
    default) flags=() ;;
    w*) flags=(--batching on --batch-max-queue-delay-us "${v#w}") ;;
  esac
  target/release/infergate serve --triton-url "http://127.0.0.1:$tg" --grpc-addr "127.0.0.1:$g" \
    --http-addr "127.0.0.1:$h" "${flags[@]}" >"$work/infergate-$v.log" 2>&1 &
  pids+=($!)
  grpc[$v]="127.0.0.1:$g"; http[$v]="127.0.0.1:$h"
  for _ in $(seq 1 100); do curl -sf "127.0.0.1:$h/v2/health/ready" >/dev/null && break; sleep 0.1; done
done
rg=$(port); rh=$(port); k=$(port)
target/release/examples/tcp_relay "127.0.0.1:$rg" "127.0.0.1:$tg" >"$work/relay-grpc.log" 2>&1 &
pids+=($!)
target/release/examples/tcp_relay "127.0.0.1:$rh" "127.0.0.1:$th" >"$work/relay-http.log" 2>&1 &
pids+=($!)
target/release/examples/kserve_ceiling "127.0.0.1:$k" >"$work/ceiling.log" 2>&1 &
pids+=($!)
grpc[relay]="127.0.0.1:$rg"; http[relay]="127.0.0.1:$rh"; grpc[ceiling]="127.0.0.1:$k"
sleep 0.5

for round in $(seq 1 "$ROUNDS"); do
  for c in $CONCURRENCIES; do
    for model in add_sub add_sub_delay; do
      for proto in grpc http; do
        names=(direct relay "${variants[@]}")
        [[ $proto == grpc ]] && names+=(ceiling)
        for n in "${names[@]}"; do
          if [[ $proto == grpc ]]; then addr="${grpc[$n]}"; else addr="${http[$n]}"; fi
          out="$work/$proto-$model-$n-c$c-r$round.json"
          timeout 60 target/release/infergate-load "--$proto" "$addr" -m "$model" -c "$c" \
            -z "${SECONDS_PER_CELL}s" --warmup 1s -q --json "$out" >/dev/null 2>&1 || true
        done
        echo "round $round c=$c $model $proto done" >&2
      done
    done
  done
done

mkdir -p loadtest/results
out="loadtest/results/windows-$(date -u +%Y%m%d-%H%M).md"
"$VENV/bin/python" - "$work" "$ROUNDS" "$CONCURRENCIES" "$SECONDS_PER_CELL" >"$out" <<'PY'
import json, os, statistics, sys
work, rounds, concs, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
label = {"direct": "Triton direct", "relay": "byte relay", "ceiling": "ceiling server",
         "off": "infergate off", "default": "infergate default", "w100": "infergate on, 100 µs",
         "w300": "infergate on, 300 µs", "w1000": "infergate on, 1 ms"}
def cell(proto, model, name, c):
    thr, p50, p99 = [], [], []
    for r in range(1, rounds + 1):
        path = os.path.join(work, f"{proto}-{model}-{name}-c{c}-r{r}.json")
        if not os.path.exists(path):
            continue
        j = json.load(open(path))
        if j.get("count", 0) == 0 or set(j["statusCodeDistribution"]) - {"OK", "200"}:
            continue
        dist = {d["percentage"]: d["latency"] for d in j["latencyDistribution"]}
        thr.append(j["rps"]); p50.append(dist[50] / 1e6); p99.append(dist[99] / 1e6)
    if not thr:
        return None
    return statistics.median(thr), statistics.median(p50), statistics.median(p99)
print(f"infergate-load, closed loop, {secs} s a cell after 1 s of warm-up, median of {rounds} interleaved rounds, "
      "every process on the same 2 shared cores. add_sub_delay is add_sub with Triton's own "
      "max_queue_delay_microseconds: 100. HTTP uses the binary tensor extension.\n")
targets = []
for proto in ["grpc", "http"]:
    for model in ["add_sub", "add_sub_delay"]:
        print(f"### {proto}, {model}\n")
        print("| target | c | req/s | × relay | × ceiling | × direct | p50 ms | p99 ms | p50 − relay ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        names = ["direct", "relay", "off", "default", "w100", "w300", "w1000"] + (["ceiling"] if proto == "grpc" else [])
        for c in concs:
            relay, top, base = cell(proto, model, "relay", c), cell(proto, model, "ceiling", c), cell(proto, model, "direct", c)
            for n in names:
                v = cell(proto, model, n, c)
                if v is None:
                    print(f"| {label[n]} | {c} | no measurement | | | | | | |")
                    continue
                r = f"{v[0] / relay[0]:.2f}" if relay else "–"
                t = f"{v[0] / top[0]:.2f}" if top else "–"
                d = f"{v[0] / base[0]:.2f}" if base else "–"
                add = f"{v[1] - relay[1]:+.3f}" if relay else "–"
                print(f"| {label[n]} | {c} | {v[0]:,.0f} | {r} | {t} | {d} | {v[1]:.3f} | {v[2]:.3f} | {add} |")
        print()
PY
cat "$out"
echo "written to $out" >&2
