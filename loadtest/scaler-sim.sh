#!/usr/bin/env bash
# The autoscaling simulator (examples/scaler_sim.rs) on a day of demand per seed: queue depth
# only, HPA on CPU, infergate's tiers 1 + 2, and its three tiers, all on the scaler's own
# decision code. Writes loadtest/results/scaler-sim-<date>.md (the tables) and one picture per
# seed, loadtest/results/scaler-sim-<date>-seed<N>.html, and prints the tables.
#   loadtest/scaler-sim.sh [SEEDS="42 1 7"]
# No network: a pure computation, a few seconds per seed.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${1:-42 1 7}"
cargo build --release --locked --quiet --example scaler_sim
stamp="$(date -u +%Y%m%d-%H%M)"
out="loadtest/results/scaler-sim-$stamp.md"
{
  echo "# Autoscaling simulator, $(date -u '+%Y-%m-%d %H:%M') UTC"
  echo
  echo "\`loadtest/scaler-sim.sh \"$SEEDS\"\`; the model is described at the top of"
  echo "\`examples/scaler_sim.rs\`. SLO: a sync call answered within 1 s, a task within 30 s."
  for seed in $SEEDS; do
    echo
    echo "## Seed $seed"
    echo
    target/release/examples/scaler_sim "$seed" "loadtest/results/scaler-sim-$stamp-seed$seed.html" \
      | sed "s|picture: loadtest/results/|picture: |"
  done
} > "$out"
cat "$out"
