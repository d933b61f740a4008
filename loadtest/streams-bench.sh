#!/usr/bin/env bash
# Streams of a decoupled model (token_stream), infergate against Triton directly, in one run:
# the same gRPC ModelStreamInfer load (infergate-load's stream mode) on each in turn, round
# after round, at 1 and 64 concurrent streams. A byte relay to Triton (examples/tcp_relay.rs,
# one hop and no parsing) runs beside them: the floor of any front end on this host. And
# "direct, a call each": Triton directly with each request on a ModelStreamInfer call of its
# own, as infergate sends them upstream (so that cancelling one cancels it alone): what Triton
# itself spends opening a call per request. Reported per target: time to first response
# (p50, p99) and the gap between responses (p50, p99), whose difference from direct is what
# infergate adds. Then 1,000 idle streams (each waiting on the model) held through infergate,
# with infergate's resident memory before and while they are held.
# Writes loadtest/results/streams-<date>.md and prints it.
#   [NO_BUILD=1] loadtest/streams-bench.sh [ROUNDS=3] [TOKENS=20] [DELAY_MS=5] [SECONDS=8] [IDLE=1000]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"; TOKENS="${2:-20}"; DELAY="${3:-5}"; SECS="${4:-8}"; IDLE="${5:-1000}"
VENV="$(scripts/install-triton.sh)"
[[ -n ${NO_BUILD:-} ]] || cargo build --release --locked --quiet --bins --example tcp_relay
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
start_triton
ig=$(port); ih=$(port)
target/release/infergate serve --triton-url "http://127.0.0.1:$tg" \
  --grpc-addr "127.0.0.1:$ig" --http-addr "127.0.0.1:$ih" >"$work/infergate.log" 2>&1 &
ig_pid=$!; pids+=($ig_pid)
r=$(port)
target/release/examples/tcp_relay "127.0.0.1:$r" "127.0.0.1:$tg" >"$work/relay.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "127.0.0.1:$ih/v2/health/ready" >/dev/null && break; sleep 0.1; done
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

load() { # target concurrency JSON-file [infergate-load flags...]
  local addr=$1 c=$2 out=$3; shift 3
  target/release/infergate-load --grpc "$addr" -m token_stream -c "$c" -q "$@" \
    --stream-tokens "$TOKENS" --stream-delay-ms "$DELAY" -z "${SECS}s" --warmup 1s --json "$out" >/dev/null
}
# Warm both paths (model threads, connections) once.
load "127.0.0.1:$tg" 8 "$work/warm.json"; load "127.0.0.1:$r" 8 "$work/warm.json"
load "127.0.0.1:$ig" 8 "$work/warm.json"

rows=()
for round in $(seq 1 "$ROUNDS"); do
  for c in 1 64; do
    for t in direct "direct, a call each" relay infergate; do
      flags=()
      case $t in
        direct) addr="127.0.0.1:$tg" ;;
        direct,*) addr="127.0.0.1:$tg"; flags=(--stream-per-request) ;;
        relay) addr="127.0.0.1:$r" ;;
        *) addr="127.0.0.1:$ig" ;;
      esac
      load "$addr" "$c" "$work/t-$c-$round.json" "${flags[@]}"
      rows+=("$(python3 - "$work/t-$c-$round.json" "$t" "$c" "$round" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"| {sys.argv[4]} | {sys.argv[3]} | {sys.argv[2]} | {r['requests']} | {r['errors']} | "
      f"{r['firstP50Ms']:.3f} | {r['firstP99Ms']:.3f} | {r['gapP50Ms']:.3f} | {r['gapP99Ms']:.3f} | "
      f"{r['requestsPerSecond']:.1f} |")
PY
)")
    done
  done
done

# Idle streams: each asks for 2 responses a long delay apart, so it waits after the first.
before=$(rss "$ig_pid")
target/release/infergate-load --grpc "127.0.0.1:$ig" -m token_stream -c "$IDLE" -q \
  --stream-hold 10s --warmup 0s --json "$work/idle.json" >"$work/idle.txt" 2>&1 &
idle_pid=$!
held_rss=0
for _ in $(seq 1 40); do
  sleep 0.5
  open=$(curl -s "127.0.0.1:$ih/metrics" | awk '/^infergate_streams_open\{model="token_stream"\}/ {print $2}')
  r=$(rss "$ig_pid"); (( r > held_rss )) && held_rss=$r
  [[ ${open:-0} == "$IDLE" ]] && { sleep 2; r=$(rss "$ig_pid"); (( r > held_rss )) && held_rss=$r; break; }
done
wait "$idle_pid" || true
held=$(python3 -c "import json; print(json.load(open('$work/idle.json'))['held'])" 2>/dev/null || echo 0)
sleep 1
after=$(curl -s "127.0.0.1:$ih/metrics" | awk '/^infergate_streams_open\{model="token_stream"\}/ {print $2}')

out="loadtest/results/streams-$(date -u +%Y%m%d-%H%M).md"
{
  echo "# Streams: infergate against Triton directly ($(date -u +%Y-%m-%d\ %H:%M) UTC)"
  echo
  echo "token_stream, $TOKENS responses per request ${DELAY} ms apart, ${SECS} s per cell after 1 s of warm-up;"
  echo "each worker keeps one ModelStreamInfer stream and sends its requests one after another."
  echo "Host: $(nproc) cores, shared; infergate release build; Triton $(basename "$VENV") CPU build."
  echo
  echo "| round | streams | target | requests | errors | first p50 ms | first p99 ms | gap p50 ms | gap p99 ms | requests/s |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "## $IDLE idle streams through infergate"
  echo
  echo "| streams held (first response in) | infergate RSS before (KiB) | RSS while held (KiB) | per stream (KiB) | streams open after they closed |"
  echo "|---|---|---|---|---|"
  echo "| $held | $before | $held_rss | $(( (held_rss - before) / (held > 0 ? held : 1) )) | ${after:-0} |"
} >"$out"
cat "$out"
