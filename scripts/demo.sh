#!/usr/bin/env bash
# infergate's main job on one machine: a real Triton serving triton-models/ on its standard
# ports (8000 HTTP, 8001 gRPC), infergate in front of it with its embedded defaults
# (HTTP 127.0.0.1:8080, gRPC 127.0.0.1:8081, Triton at 127.0.0.1:8001), then real requests
# through infergate over HTTP/JSON and gRPC, and one async task (in-memory broker and store,
# the embedded default), with the results printed. Stops both at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(scripts/install-triton.sh)"
cargo build --release --locked --quiet

for port in 8000 8001 8002 8080 8081; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use: stop what listens there first" >&2
    exit 1
  fi
done

logs="$(mktemp -d)"
cleanup() { kill "${gate:-}" "${triton:-}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
INFERGATE_WATCH_PID=$$ scripts/start-triton.sh 8001 8000 8002 >"$logs/triton.log" 2>&1 &
triton=$!
echo "starting Triton (log: $logs/triton.log) ..."
for _ in $(seq 1 300); do
  curl -sf localhost:8000/v2/health/ready >/dev/null && break
  sleep 0.2
done
curl -sf localhost:8000/v2/health/ready >/dev/null || { echo "Triton did not start" >&2; tail -20 "$logs/triton.log" >&2; exit 1; }

target/release/infergate serve >"$logs/infergate.log" 2>&1 &
gate=$!
for _ in $(seq 1 100); do
  curl -sf localhost:8080/v2/health/ready >/dev/null && break
  sleep 0.1
done
echo "infergate is ready (log: $logs/infergate.log)"
echo

echo "== HTTP/JSON  POST /v2/models/add_sub/infer"
curl -s localhost:8080/v2/models/add_sub/infer -H 'content-type: application/json' -d '{
  "inputs": [
    {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]},
    {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}]}'
echo; echo
echo "== HTTP/JSON  POST /v2/models/text_stats/infer"
curl -s localhost:8080/v2/models/text_stats/infer -d '{
  "inputs": [{"name": "TEXT", "shape": [2, 1], "datatype": "BYTES", "data": ["hello", "infergate"]}]}'
echo; echo
echo "== A bad request gets a clear error (HTTP 400)"
curl -s -w '  -> HTTP %{http_code}\n' localhost:8080/v2/models/add_sub/infer -d '{
  "inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": "FP32", "data": [1,2,3]}]}'
echo
echo "== gRPC with tritonclient (binary tensors): onnx_linear and add_sub"
"$VENV/bin/python" - <<'PY'
import numpy as np
import tritonclient.grpc as g

c = g.InferenceServerClient("127.0.0.1:8081")
print("server:", c.get_server_metadata().name, c.get_server_metadata().version, "ready:", c.is_server_ready())
x = np.array([[1, 2, 3, 4], [0.5, 0, -1, 2]], dtype=np.float32)
i = g.InferInput("X", list(x.shape), "FP32"); i.set_data_from_numpy(x)
print("onnx_linear Y =", c.infer("onnx_linear", [i]).as_numpy("Y").tolist())
a = np.arange(16, dtype=np.float32).reshape(1, 16); b = np.full((1, 16), 10, np.float32)
ins = [g.InferInput("INPUT0", [1, 16], "FP32"), g.InferInput("INPUT1", [1, 16], "FP32")]
ins[0].set_data_from_numpy(a); ins[1].set_data_from_numpy(b)
r = c.infer("add_sub", ins)
print("add_sub OUTPUT0 =", r.as_numpy("OUTPUT0").tolist())
print("add_sub OUTPUT1 =", r.as_numpy("OUTPUT1").tolist())
PY
echo
echo "== Async task: POST /v1/models/seq_sum/tasks (202 at once), then poll GET /v1/tasks/{id}"
task=$(curl -s localhost:8080/v1/models/seq_sum/tasks -H 'Idempotency-Key: demo-1' -d '{
  "inputs": [{"name": "SEQ", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}')
echo "$task"
id=$("$VENV/bin/python" -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$task")
for _ in $(seq 1 50); do
  state=$(curl -s "localhost:8080/v1/tasks/$id")
  case "$state" in *'"status":"succeeded"'*|*'"status":"failed"'*) break ;; esac
  sleep 0.1
done
echo "$state"
echo
echo "demo finished; stopping infergate and Triton"
