#!/usr/bin/env bash
# Makes sure the services the tests talk to are up on loopback: Redis on 127.0.0.1:6379.
# Installs Redis from Debian if it is missing, starts it if it is not answering.
set -euo pipefail
if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
  exit 0
fi
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server from Debian" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq redis-server >&2
fi
redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG || \
  redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --daemonize yes >&2
for _ in $(seq 1 50); do
  redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && exit 0
  sleep 0.1
done
echo "Redis did not start on 127.0.0.1:6379" >&2
exit 1
