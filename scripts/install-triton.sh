#!/usr/bin/env bash
# Installs the CPU build of Triton Inference Server 2.51 (from PyPI's nvidia-pytriton wheel), the
# Python clients used by the conformance tests and perf_analyzer, into one cached venv.
# Idempotent: a finished install is marked by a stamp file and skipped next time.
# Prints nothing on success but the venv path (last line), so callers can `$(...)` it.
set -euo pipefail

VENV="${INFERGATE_TRITON_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/infergate/triton-venv}"
STAMP="$VENV/.infergate-installed-v1"

# rotel (a real OTLP collector, used by the trace tests) came later: add it to older venvs.
ROTEL_PIN="rotel==0.0.1a15"
# sseclient-py (an SSE client library, for the generate_stream tests) came later too.
SSE_PIN="sseclient-py==1.8.0"
# The official openai package and the tokenizers package (tests of the OpenAI front) came later.
OPENAI_PINS=("openai==3.63.0" "tokenizers==0.23.3")
if [[ -f "$STAMP" ]]; then
  if [[ ! -x "$VENV/lib/python3.11/site-packages/rotel/rotel-agent" ]]; then
    "$VENV/bin/pip" install -q --pre "$ROTEL_PIN" >&2
  fi
  if [[ ! -f "$VENV/lib/python3.11/site-packages/sseclient/__init__.py" ]]; then
    "$VENV/bin/pip" install -q "$SSE_PIN" >&2
  fi
  site="$VENV/lib/python3.11/site-packages"
  if [[ ! -f "$site/openai/__init__.py" || ! -f "$site/tokenizers/__init__.py" ]]; then
    "$VENV/bin/pip" install -q "${OPENAI_PINS[@]}" >&2
  fi
  echo "$VENV"
  exit 0
fi

# The python-backend stub links Debian's libpython3.11, so the venv must come from that python.
PY=/usr/bin/python3.11
if [[ ! -x "$PY" ]] || ! ldconfig -p | grep -q libpython3.11.so.1.0 || ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3.11, libpython3.11 and venv from Debian" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq python3.11 libpython3.11 python3.11-venv >&2
fi

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >&2
# nvidia-pytriton carries the tritonserver binary; tritonclient 2.51.0 carries perf_analyzer.
"$VENV/bin/pip" install -q \
  "nvidia-pytriton==0.7.0" \
  "tritonclient[all]==2.51.0" \
  "numpy<2" \
  "onnxruntime>=1.17,<1.24" \
  "grpcio-tools" "grpcio-reflection<1.63" "protobuf>=4.21.6,<5" >&2
"$VENV/bin/pip" install -q --pre "$ROTEL_PIN" >&2
"$VENV/bin/pip" install -q "$SSE_PIN" >&2
"$VENV/bin/pip" install -q "${OPENAI_PINS[@]}" >&2

TS="$("$VENV/bin/python" -c 'import pytriton, os; print(os.path.join(os.path.dirname(pytriton.__file__), "tritonserver"))')"
test -x "$TS/bin/tritonserver"

# perf_analyzer needs libcudart/libb64 which pytriton vendors under odd names: link them.
LIBS="$VENV/infergate-libs"
mkdir -p "$LIBS"
VENDORED="$(dirname "$(dirname "$TS")")/nvidia_pytriton.libs"
for pattern in 'libcudart*.so*' 'libb64*.so*'; do
  for f in "$VENDORED"/$pattern; do
    [[ -e "$f" ]] || continue
    base="$(basename "$f")"
    case "$base" in
      libcudart*) ln -sf "$f" "$LIBS/libcudart.so.12" ;;
      libb64*) ln -sf "$f" "$LIBS/libb64.so.0d" ;;
    esac
  done
done

touch "$STAMP"
echo "$VENV"
