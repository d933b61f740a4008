#!/usr/bin/env bash
# Does a route's shadow slow its callers? Three routes on one infergate, the same primary
# (`slow` answering at once: --param delay_ms=0), interleaved rounds of infergate-load:
#   plain        no shadow;
#   shadow_ok    every request also sent to a healthy shadow (`slow`);
#   shadow_hang  every request also sent to a shadow that hangs 5 s per call (`flaky`,
#                control file `slow:5000`), at most 16 at once: the rest are dropped.
# Writes loadtest/results/shadow-<date>.md and prints it.
#   loadtest/shadow-bench.sh [ROUNDS=3] [CONCURRENCY=8] [SECONDS=4]
# Everything listens on 127.0.0.1 only and stops when the script exits.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
CONC="${2:-8}"
SECS="${3:-4}"
VENV="$(scripts/install-triton.sh)"
cargo build --release --locked --quiet --bins
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
control=/tmp/infergate-flaky-control
trap 'rm -f "$control"; cleanup' EXIT
echo "slow:5000" >"$control"
start_triton
cat >"$work/routes.toml" <<'TOML'
[routes.plain]
targets = [{ model = "slow", weight = 1 }]

[routes.shadow_ok]
targets = [{ model = "slow", weight = 1 }]
shadow = { model = "slow", share = 1.0, max_in_flight = 64 }

[routes.shadow_hang]
targets = [{ model = "slow", weight = 1 }]
shadow = { model = "flaky", share = 1.0, max_in_flight = 16 }
TOML
g=$(port); h=$(port)
target/release/infergate serve --triton-url "http://127.0.0.1:$tg" --grpc-addr "127.0.0.1:$g" \
  --http-addr "127.0.0.1:$h" --routes-file "$work/routes.toml" >"$work/infergate.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "127.0.0.1:$h/v2/health/ready" >/dev/null && break; sleep 0.1; done
routes=(plain shadow_ok shadow_hang)
for round in $(seq 1 "$ROUNDS"); do
  for r in "${routes[@]}"; do
    timeout 60 target/release/infergate-load --grpc "127.0.0.1:$g" -m "$r" --param delay_ms=0 \
      -c "$CONC" -z "${SECS}s" --warmup 1s -q --json "$work/$r-r$round.json" >/dev/null 2>&1 || true
  done
  echo "round $round done" >&2
done
curl -s "127.0.0.1:$h/metrics" | grep '^infergate_route_shadow_total' >"$work/shadow-metrics.txt" || true
mkdir -p loadtest/results
out="loadtest/results/shadow-$(date -u +%Y%m%d-%H%M).md"
"$VENV/bin/python" - "$work" "$ROUNDS" "$CONC" "$SECS" >"$out" <<'PY'
import json, os, statistics, sys
work, rounds, conc, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def cell(r):
    thr, p50, p99, bad = [], [], [], 0
    for k in range(1, rounds + 1):
        p = os.path.join(work, f"{r}-r{k}.json")
        if not os.path.exists(p):
            continue
        j = json.load(open(p))
        bad += sum(v for s, v in j["statusCodeDistribution"].items() if s not in ("OK", "200"))
        d = {x["percentage"]: x["latency"] for x in j["latencyDistribution"]}
        thr.append(j["rps"]); p50.append(d[50] / 1e6); p99.append(d[99] / 1e6)
    return statistics.median(thr), statistics.median(p50), statistics.median(p99), bad
print(f"# Shadow traffic and the caller, {conc} callers, {secs} s a cell, median of {rounds} interleaved rounds\n")
print("`loadtest/shadow-bench.sh`: one infergate, three routes over the same primary (`slow`, "
      "answering at once). Ratios against `plain` in the same run.\n")
print("| route | req/s | × plain | p50 ms | p99 ms | errors |")
print("|---|---|---|---|---|---|")
base = cell("plain")
for r in ["plain", "shadow_ok", "shadow_hang"]:
    t, p50, p99, bad = cell(r)
    print(f"| {r} | {t:.0f} | {t / base[0]:.2f} | {p50:.2f} | {p99:.2f} | {bad} |")
print("\nShadow calls at the end (`infergate_route_shadow_total`):\n\n```")
print(open(os.path.join(work, "shadow-metrics.txt")).read().strip())
print("```")
PY
cat "$out"
