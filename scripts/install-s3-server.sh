#!/usr/bin/env bash
# Installs moto's S3-compatible server (pinned, from PyPI) into a cached venv and prints the
# venv's path. Used by tests/claim_check.rs to keep claim-check blobs on a real S3 API.
set -euo pipefail
VERSION=5.2.6
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/infergate/moto-$VERSION"
# The stamp is written last, so an interrupted install is redone rather than trusted.
if [[ ! -f "$VENV/.installed" ]]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$VERSION" >&2
  touch "$VENV/.installed"
fi
echo "$VENV"
