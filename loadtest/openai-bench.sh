#!/usr/bin/env bash
# Streaming chat through infergate's OpenAI front against Triton's own generate_stream, in one
# run: the same SSE client (examples/sse_load.rs) on each target in turn, round after round,
# at 1 and 16 concurrent streams, on tiny_chat (TOKENS tokens per answer, no delay).
#   - Triton generate_stream: the prompt rendered as infergate renders it, straight to Triton.
#   - infergate generate_stream: the same body through infergate's Triton-protocol path.
#   - infergate chat: /v1/chat/completions with stream, the chat template, the tokenizer's
#     counts and a tenant budget (large enough never to refuse).
# Reported per target: time to first token (p50, p99), tokens/s, and infergate's CPU per
# streamed token (its process's user + system ticks over the tokens it relayed).
# Writes loadtest/results/openai-<date>.md and prints it.
#   [NO_BUILD=1] loadtest/openai-bench.sh [ROUNDS=3] [TOKENS=64] [SECONDS=8]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"; TOKENS="${2:-64}"; SECS="${3:-8}"
VENV="$(scripts/install-triton.sh)"
[[ -n ${NO_BUILD:-} ]] || cargo build --release --locked --quiet --bins --example sse_load
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
start_triton
ig=$(port); ih=$(port)
cat >"$work/openai.toml" <<EOF
[[auth.keys]]
key = "bench-key-0123456789"
tenant = "bench"

[[openai.models]]
name = "tiny-chat"
triton_model = "tiny_chat"
tokenizer = "$PWD/triton-models/tiny_chat/tokenizer"

[[openai.tenants]]
tenant = "bench"
tokens_per_minute = 1000000000
requests_per_minute = 1000000000
EOF
target/release/infergate serve --config "$work/openai.toml" --triton-url "http://127.0.0.1:$tg" \
  --grpc-addr "127.0.0.1:$ig" --http-addr "127.0.0.1:$ih" >"$work/infergate.log" 2>&1 &
ig_pid=$!; pids+=($ig_pid)
for _ in $(seq 1 100); do curl -sf "127.0.0.1:$ih/v2/health/ready" >/dev/null && break; sleep 0.1; done

# TOKENS words the model says back: one token each.
words=$(python3 -c "import sys; w='red green blue cat dog sun moon star'.split(); print(' '.join(w[i % 8] for i in range($TOKENS)))")
prompt=$(python3 -c "import json,sys; print(json.dumps('<|user|>\n' + sys.argv[1] + '<|end|>\n<|assistant|>\n'))" "$words")
gen_body="{\"text_input\": $prompt, \"max_tokens\": $TOKENS}"
chat_body="{\"model\": \"tiny-chat\", \"stream\": true, \"max_tokens\": $TOKENS, \"messages\": [{\"role\": \"user\", \"content\": \"$words\"}]}"
load() { # url body c json-out [key]
  target/release/examples/sse_load "$1" "$2" "$3" "$SECS" ${5:+"$5"} >"$4"
}
direct="http://127.0.0.1:$th/v2/models/tiny_chat/generate_stream"
via_gen="http://127.0.0.1:$ih/v2/models/tiny_chat/generate_stream"
via_chat="http://127.0.0.1:$ih/v1/chat/completions"
KEY=bench-key-0123456789
# Warm every path once.
for u in "$direct" "$via_gen"; do SECS=1 load "$u" "$gen_body" 4 "$work/warm.json" "$KEY"; done
SECS=1 load "$via_chat" "$chat_body" 4 "$work/warm.json" "$KEY"

rows=()
for round in $(seq 1 "$ROUNDS"); do
  for c in 1 16; do
    for t in "Triton generate_stream" "infergate generate_stream" "infergate chat"; do
      case $t in
        Triton*) url=$direct; body=$gen_body ;;
        *generate_stream) url=$via_gen; body=$gen_body ;;
        *) url=$via_chat; body=$chat_body ;;
      esac
      before=$(ticks "$ig_pid")
      load "$url" "$body" "$c" "$work/r.json" "$KEY"
      after=$(ticks "$ig_pid")
      rows+=("$(python3 - "$work/r.json" "$t" "$c" "$round" "$before" "$after" "$(getconf CLK_TCK)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
b, a, hz = sys.argv[5].split(), sys.argv[6].split(), int(sys.argv[7])
cpu_ms = (int(a[0]) + int(a[1]) - int(b[0]) - int(b[1])) * 1000 / hz
per = "–" if sys.argv[2].startswith("Triton") else f"{cpu_ms * 1000 / max(r['tokens'], 1):.1f}"
print(f"| {sys.argv[4]} | {sys.argv[3]} | {sys.argv[2]} | {r['requests']} | {r['errors']} | "
      f"{r['firstP50Ms']:.3f} | {r['firstP99Ms']:.3f} | {r['tokensPerSecond']:.0f} | {per} |")
PY
)")
    done
  done
done

out="loadtest/results/openai-$(date -u +%Y%m%d-%H%M).md"
{
  echo "# Streaming chat: infergate's OpenAI front against Triton's generate_stream ($(date -u +%Y-%m-%d\ %H:%M) UTC)"
  echo
  echo "tiny_chat, $TOKENS tokens per answer (one per response, no delay), ${SECS} s per cell, closed loop;"
  echo "the same SSE client (examples/sse_load.rs) on every target, one after another in each round."
  echo "Host: $(nproc) cores, shared; infergate release build; Triton $(basename "$VENV") CPU build."
  echo "CPU µs/token: infergate's user + system time over the tokens it relayed (– for Triton directly)."
  echo
  echo "| round | streams | target | requests | errors | first token p50 ms | p99 ms | tokens/s | infergate CPU µs/token |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$out"
cat "$out"
