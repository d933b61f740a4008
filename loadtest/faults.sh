#!/usr/bin/env bash
# The fault matrix (tests/fault_matrix.rs): Redis killed, emptied and paused, RabbitMQ
# restarted and its task queue deleted, Triton killed, each under a steady mix of submit,
# poll, cancel, dead-letter list and replay, sync inference, response-cache, webhook and
# scaler calls. Needs Redis on 6379 and
# RabbitMQ on 5672 (rabbitmqctl restarts it: run on a machine of your own). Writes
# results/faults-<date>.md with the table the test prints.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="$here/loadtest/results/faults-$(date -u +%Y%m%d-%H%M).md"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
(cd "$here" && cargo test ${PROFILE:+--profile "$PROFILE"} --test fault_matrix -- --nocapture) 2>&1 | tee "$log"
{
  echo "# fault matrix: $(date -u '+%Y-%m-%d %H:%M UTC'), $(git -C "$here" rev-parse --short HEAD), ${PROFILE:-debug} build"
  echo
  grep -E '^\|' "$log"
  echo
  grep -E '^test result' "$log"
} >"$out"
echo "wrote $out"
