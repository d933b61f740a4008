#!/usr/bin/env bash
# Fuzzes the request decoders for a bounded time each (default 60 s per target) with
# cargo-fuzz (libFuzzer) on the nightly toolchain:
#   http_decode          HTTP infer bodies: JSON tensors and the binary tensor extension
#   grpc_validate_split  gRPC ModelInferRequest bytes: decode, validate, split/concat rows
# A single allocation over 64 MiB counts as a crash (nothing may be sized from a declared
# shape), as does any panic. Crashes are written to fuzz/artifacts/<target>/ and fail the run;
# each one found becomes a regression test beside the code it broke.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzzing needs the nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in http_decode grpc_validate_split; do
  mkdir -p "fuzz/corpus/$target"
  echo "== $target: ${secs}s"
  # The checked-in seeds stay read-only: new inputs go to a scratch corpus first.
  scratch="$(mktemp -d)"
  log="$(mktemp)"
  if ! cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$scratch" "fuzz/corpus/$target" -- \
      -max_total_time="$secs" -max_len=65536 -malloc_limit_mb=64 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "$target failed; crash inputs (if any) are in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)|^#[0-9]+ +DONE" "$log" || true
  rm -rf "$scratch" "$log"
done
