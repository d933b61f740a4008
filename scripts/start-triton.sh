#!/usr/bin/env bash
# Starts Triton (CPU build from the cached venv) in the foreground on the given ports, serving
# triton-models/ (or $TRITON_MODELS). Used by the tests, the demo and the benchmarks.
#   scripts/start-triton.sh GRPC_PORT HTTP_PORT METRICS_PORT [extra tritonserver flags...]
# It listens on 127.0.0.1, or on $TRITON_ADDRESS (another loopback address for a fleet).
# With INFERGATE_WATCH_PID set, Triton is stopped when that process exits, so a test run that
# dies never leaves a server behind.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
addr="${TRITON_ADDRESS:-127.0.0.1}"
grpc_port="${1:?grpc port}"; http_port="${2:?http port}"; metrics_port="${3:?metrics port}"; shift 3

VENV="$("$here/scripts/install-triton.sh")"
TS="$("$VENV/bin/python" -c 'import pytriton, os; print(os.path.join(os.path.dirname(pytriton.__file__), "tritonserver"))')"
# pip reinstalls drop the python-backend stub from the backend folder: put it back when it is
# missing or different. Copy then rename: another Triton may be running the old file, which a
# plain overwrite refuses ("Text file busy") but a rename replaces safely.
stub_src="$TS/python_backend_stubs/3.11/triton_python_backend_stub"
stub_dst="$TS/backends/python/triton_python_backend_stub"
if ! cmp -s "$stub_src" "$stub_dst"; then
  tmp_stub="$(mktemp "$stub_dst.XXXXXX")"
  cp -f "$stub_src" "$tmp_stub" && chmod 755 "$tmp_stub" && mv -f "$tmp_stub" "$stub_dst"
fi
export PATH="$VENV/bin:$PATH"
export LD_LIBRARY_PATH="$TS/external_libs:${LD_LIBRARY_PATH:-}"

"$TS/bin/tritonserver" \
  --model-repository="${TRITON_MODELS:-$here/triton-models}" \
  --backend-directory="$TS/backends" --cache-directory="$TS/caches" \
  --http-address="$addr" --grpc-address="$addr" --metrics-address="$addr" \
  --http-port="$http_port" --grpc-port="$grpc_port" --metrics-port="$metrics_port" \
  --pinned-memory-pool-byte-size=0 --exit-on-error=true --log-verbose=0 "$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null; wait $child 2>/dev/null' EXIT INT TERM
if [[ -n "${INFERGATE_WATCH_PID:-}" ]]; then
  while kill -0 "$INFERGATE_WATCH_PID" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
else
  wait "$child"
fi
