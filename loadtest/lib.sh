# Shared by the benchmark scripts (sourced from the repository root, after VENV is set):
# free loopback ports, a scratch folder, processes stopped on exit, CPU ticks from /proc, and
# a Triton serving triton-models/ on free ports (its gRPC port in $tg, HTTP in $th).

port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Clock ticks (user, system) of the given processes, summed.
ticks() {
  local u=0 s=0 stat f
  for p in "$@"; do
    stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    # After the command name (which may hold spaces): utime and stime are fields 12 and 13.
    read -r -a f <<<"${stat##*) }"
    u=$((u + f[11])); s=$((s + f[12]))
  done
  echo "$u $s"
}

start_triton() {
  tg=$(port); th=$(port); tm=$(port)
  INFERGATE_WATCH_PID=$$ scripts/start-triton.sh "$tg" "$th" "$tm" >"$work/triton.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do curl -sf "127.0.0.1:$th/v2/health/ready" >/dev/null && return 0; sleep 0.2; done
  echo "Triton did not start; see $work/triton.log" >&2
  return 1
}
