#!/usr/bin/env bash
# Installs schemathesis (pinned, from PyPI) into a cached venv and prints the venv's path.
# Used by tests/openapi.rs to fuzz the served OpenAPI document against a live infergate.
set -euo pipefail
VERSION=4.32.5
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/infergate/schemathesis-$VERSION"
# The stamp is written last, so an interrupted install is redone rather than trusted.
if [[ ! -f "$VENV/.installed" ]]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION" >&2
  touch "$VENV/.installed"
fi
echo "$VENV"
