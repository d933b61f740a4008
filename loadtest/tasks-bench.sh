#!/usr/bin/env bash
# End-to-end async throughput per broker: infergate serve (release, 2 worker loops inside)
# with the memory broker, Redis Streams and RabbitMQ in turn, each given the same load by
# infergate-load --tasks (submit N tasks at concurrency C, poll until all are final) on
# add_sub. Writes loadtest/results/tasks-<date>.md and prints it.
#   loadtest/tasks-bench.sh [TASKS=20000] [CONCURRENCY=32]
# Needs Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672): scripts/ensure-services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20000}"; C="${2:-32}"
VENV="$(scripts/install-triton.sh)"
scripts/ensure-services.sh
cargo build --release --locked --quiet
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
start_triton

cat >"$work/row.py" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
refused = sum(r["refused"].values())
print(f"| {sys.argv[2]} | {r['submitted']:,} | {r['succeeded']:,} | {r['failed']} | {refused} "
      f"| {r['submitSeconds']:.1f} | {r['totalSeconds']:.1f} | {r['tasksPerSecond']:,.0f} |")
PY
rows=()
for broker in memory redis://127.0.0.1:6379 "amqp://guest:guest@127.0.0.1:5672/%2f"; do
  store=memory; [[ $broker != memory ]] && store=redis://127.0.0.1:6379
  prefix="bench-$RANDOM$RANDOM"
  g=$(port); h=$(port)
  target/release/infergate serve --triton-url "http://127.0.0.1:$tg" --grpc-addr "127.0.0.1:$g" \
    --http-addr "127.0.0.1:$h" --broker "$broker" --task-store "$store" --redis-prefix "$prefix" \
    --workers 2 --worker-concurrency 512 --queue-capacity 1000000 --log-level warn >"$work/ig.log" 2>&1 &
  ig=$!
  for _ in $(seq 1 100); do curl -sf "127.0.0.1:$h/v2/health/ready" >/dev/null && break; sleep 0.1; done
  timeout 600 target/release/infergate-load --http "127.0.0.1:$h" -m add_sub --tasks "$N" -c "$C" \
    --timeout 300s --json "$work/run.json" -q >&2 || true
  kill "$ig"; wait "$ig" 2>/dev/null || true
  rows+=("$("$VENV/bin/python" "$work/row.py" "$work/run.json" "${broker%%://*}")")
done

mkdir -p loadtest/results
out="loadtest/results/tasks-$(date -u +%Y%m%d-%H%M).md"
{
  echo "infergate-load --tasks $N -c $C against infergate serve (release, 2 worker loops of 512), add_sub, all on the same 2 cores."
  echo
  echo "| broker | submitted | succeeded | failed | refused | submit s | total s | completed tasks/s |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$out"
cat "$out"
echo "written to $out" >&2
