#!/usr/bin/env bash
# The whole test suite (the README's test command; .ci/run runs it after fmt and clippy).
# Installs the CPU Triton and its Python clients once (cached), makes sure Redis (6379) and
# RabbitMQ (5672) answer on 127.0.0.1 (installing/starting them if needed), renders and
# validates the Helm chart in every mode (scripts/check-helm.sh), checks that no two modules
# import each other (scripts/check-modules.py), then runs every Rust unit
# and end-to-end test; the end-to-end tests start their own Triton on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== Triton (CPU build) and clients: $(scripts/install-triton.sh)"
scripts/ensure-services.sh
echo "== Redis on 127.0.0.1:6379 and RabbitMQ on 127.0.0.1:5672: up"
echo "== Modules: no import circles, no folder circles, no upward imports (scripts/check-modules.py)"
python3 scripts/check-modules.py --self-test
python3 scripts/check-modules.py
echo "== Helm chart: render and validate every mode"
scripts/check-helm.sh
cargo test --locked "$@"
