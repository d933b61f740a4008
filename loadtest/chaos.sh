#!/usr/bin/env bash
# The chaos figure of the async path (tests/chaos.rs), over Redis Streams and RabbitMQ: 10,000
# tasks submitted while the worker process is SIGKILLed three times and the broker restarted
# once; every task must succeed once. Needs Redis on 6379 and RabbitMQ on 5672 (rabbitmqctl
# restarts it: run on a machine of your own). Writes results/chaos-<date>.md.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="$here/loadtest/results/chaos-$(date -u +%Y%m%d-%H%M).md"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
(cd "$here" && cargo test ${PROFILE:+--profile "$PROFILE"} --test chaos -- --nocapture --test-threads 1) 2>&1 | tee "$log"
{
  echo "# chaos: $(date -u '+%Y-%m-%d %H:%M UTC'), $(git -C "$here" rev-parse --short HEAD), ${PROFILE:-debug} build"
  echo
  echo '```'
  grep -oE '(chaos over.*|^[0-9.]+ s: worker.*|^submissions refused.*|^all submitted.*|^succeeded.*|^Triton rows.*|^resubmitted.*|^test result.*)' "$log"
  echo '```'
} >"$out"
echo "wrote $out"
