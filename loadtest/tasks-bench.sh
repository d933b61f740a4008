#!/usr/bin/env bash
# End-to-end async throughput per broker: infergate serve (release, 2 worker loops inside)
# with the memory broker, Redis Streams and RabbitMQ in turn, each given the same load by
# infergate-load --tasks (submit N tasks at concurrency C, poll until all are final) on
# add_sub. Also reports the CPU each process spent per completed task (from /proc), since
# on this shared 2-core machine that, not wall time, says where a task's cost goes.
# With BASELINE=<dir holding another build's infergate>, each round runs that build too,
# right before this one, with the same generator: compare them by ratio within a round.
# CONCURRENCY may be a list ("32 128"): each round runs every value. AMQP_GROUPS="1 64" runs
# each RabbitMQ case once per group size (tasks.amqp_group_max), so grouping is compared in
# the same rounds; unset, the configured default applies. BLOB_STORE=file gives each run the
# claim check (`--blob-store file://<work dir>/blobs-<run>`), so its cost on small tasks (which
# stay inline) is measured against a build in the same rounds.
# Writes loadtest/results/tasks-<date>.md and prints it.
#   [BASELINE=dir] [AMQP_GROUPS="1 64"] loadtest/tasks-bench.sh [TASKS=20000] [CONCURRENCY=32] [ROUNDS=1] [BROKERS]
# Needs Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672): scripts/ensure-services.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20000}"; CONCS="${2:-32}"; ROUNDS="${3:-1}"
BROKERS="${4:-memory redis://127.0.0.1:6379 amqp://guest:guest@127.0.0.1:5672/%2f}"
VENV="$(scripts/install-triton.sh)"
scripts/ensure-services.sh
cargo build --release --locked --quiet
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
start_triton

builds=("this=target/release/infergate")
[[ -n ${BASELINE:-} ]] && builds=("baseline=$BASELINE/infergate" "${builds[@]}")
# CPU ticks (user + system) of the given processes together.
cpu() {
  local t=0 p
  for p in "$@"; do [[ -r /proc/$p/stat ]] && t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done
  echo "$t"
}
# Triton runs python-backend models (add_sub) in stub processes of its own: count them too.
triton_pid=$(pgrep -f "tritonserver.*--grpc-port=$tg" | head -1 || true)
triton_pids="$triton_pid $(pgrep -P "${triton_pid:-0}" | tr '\n' ' ' || true)"
redis_pid=$(pgrep -x redis-server | head -1 || true)
rabbit_pid=$(pgrep -f beam.smp | head -1 || true)

cat >"$work/row.py" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
refused = sum(r["refused"].values())
done = max(r["succeeded"] + r["failed"], 1)
us = lambda ticks: f"{float(ticks) / 100 / done * 1e6:.0f}"
load = sum(map(float, sys.argv[9].split()))
print(f"| {sys.argv[2]} | {sys.argv[10]} | {sys.argv[3]} | {r['submitted']:,} | {r['succeeded']:,} | {r['failed']} | {refused} "
      f"| {r['submitSeconds']:.1f} | {r['totalSeconds']:.1f} | {r['tasksPerSecond']:,.0f} "
      f"| {us(sys.argv[4])} | {load / done * 1e6:.0f} | {us(sys.argv[5])} | {us(sys.argv[6])} | {us(sys.argv[7])} "
      f"| {int(sys.argv[8]) / 1024:.0f} |")
PY
# Removes what a run left in Redis (its records live for the task TTL, an hour: 20,000 a run,
# with results) and its RabbitMQ queues, so later runs do not meet an ever larger keyspace
# (Redis's CPU per task jumped in runs after millions of keys had piled up).
forget() {
  local broker=$1 prefix=$2
  [[ $broker == memory ]] && return 0
  redis-cli --scan --pattern "$prefix:*" | xargs -r -n 1000 redis-cli unlink >/dev/null || true
  if [[ $broker == amqp* ]]; then
    for q in "$prefix.tasks" "$prefix.tasks.dead"; do rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1 || true; done
  fi
}
# The cases of one round: concurrency, broker, and RabbitMQ group size ("-": the default).
cases=()
for C in $CONCS; do
  for broker in $BROKERS; do
    groups=-; [[ $broker == amqp* && -n ${AMQP_GROUPS:-} ]] && groups=$AMQP_GROUPS
    for group in $groups; do cases+=("$C $broker $group"); done
  done
done
rows=()
for round in $(seq 1 "$ROUNDS"); do
  for case in "${cases[@]}"; do
    read -r C broker group <<<"$case"
    label="${broker%%://*}"; genv=()
    [[ $group != - ]] && label="$label g=$group" && genv=(INFERGATE_AMQP_GROUP_MAX="$group")
    store=memory; [[ $broker != memory ]] && store=redis://127.0.0.1:6379
    for build in "${builds[@]}"; do
      name="${build%%=*}"; bin="${build#*=}"
      prefix="bench-$RANDOM$RANDOM"
      g=$(port); h=$(port)
      blobs=(); [[ ${BLOB_STORE:-} == file ]] && blobs=(--blob-store "file://$work/blobs-$prefix")
      env "${genv[@]}" "$bin" serve "${blobs[@]}" --triton-url "http://127.0.0.1:$tg" --grpc-addr "127.0.0.1:$g" \
        --http-addr "127.0.0.1:$h" --broker "$broker" --task-store "$store" --redis-prefix "$prefix" \
        --workers 2 --worker-concurrency 512 --queue-capacity 1000000 --log-level warn >"$work/ig.log" 2>&1 &
      ig=$!
      for _ in $(seq 1 100); do curl -sf "127.0.0.1:$h/v2/health/ready" >/dev/null && break; sleep 0.1; done
      before=("$(cpu $ig)" "$(cpu "$redis_pid")" "$(cpu "$rabbit_pid")" "$(cpu $triton_pids)")
      /usr/bin/time -f "%U %S" -o "$work/load-cpu" timeout 600 target/release/infergate-load \
        --http "127.0.0.1:$h" -m add_sub --tasks "$N" -c "$C" --timeout 300s --json "$work/run.json" -q >&2 || true
      after=("$(cpu $ig)" "$(cpu "$redis_pid")" "$(cpu "$rabbit_pid")" "$(cpu $triton_pids)")
      hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$ig/status")
      kill "$ig"; wait "$ig" 2>/dev/null || true
      forget "$broker" "$prefix"
      rows+=("$("$VENV/bin/python" "$work/row.py" "$work/run.json" "$label" "$name" \
        $((after[0] - before[0])) $((after[1] - before[1])) $((after[2] - before[2])) \
        $((after[3] - before[3])) "$hwm" "$(tail -1 "$work/load-cpu")" "$C")")
    done
  done
done

mkdir -p loadtest/results
out="loadtest/results/tasks-$(date -u +%Y%m%d-%H%M).md"
{
  echo "infergate-load --tasks $N -c ($CONCS) against infergate serve (release, 2 worker loops of 512${BLOB_STORE:+, with a $BLOB_STORE blob store (the claim check)}), add_sub, all on the same 2 cores; $ROUNDS round(s), builds interleaved${BASELINE:+ (baseline: $BASELINE)}."
  echo "CPU columns: microseconds of CPU each process spent per completed task (user + system). Peak RSS: infergate's VmHWM over the run."
  echo
  echo "| broker | c | build | submitted | succeeded | failed | refused | submit s | total s | completed tasks/s | CPU µs infergate | load generator | redis | rabbitmq | triton | infergate peak RSS MiB |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$out"
cat "$out"
echo "written to $out" >&2
