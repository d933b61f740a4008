#!/usr/bin/env bash
# Starts rotel-agent, a real OpenTelemetry collector (PyPI `rotel`, installed into the Triton
# venv), on loopback: OTLP/gRPC and OTLP/HTTP in, every span printed to stdout (debug log),
# nothing exported. The trace tests read that log.
#   scripts/start-otlp-receiver.sh GRPC_PORT HTTP_PORT
# With INFERGATE_WATCH_PID set, the receiver stops when that process exits.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
grpc_port="${1:?grpc port}"; http_port="${2:?http port}"
VENV="$("$here/scripts/install-triton.sh")"
"$VENV/lib/python3.11/site-packages/rotel/rotel-agent" start \
  --otlp-grpc-endpoint "127.0.0.1:$grpc_port" --otlp-http-endpoint "127.0.0.1:$http_port" \
  --exporter blackhole --debug-log traces --debug-log-verbosity detailed &
child=$!
trap 'kill -TERM $child 2>/dev/null; wait $child 2>/dev/null' EXIT INT TERM
if [[ -n "${INFERGATE_WATCH_PID:-}" ]]; then
  while kill -0 "$INFERGATE_WATCH_PID" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
else
  wait "$child"
fi
