#!/usr/bin/env bash
# Makes sure the services the tests talk to are up on loopback: Redis on 127.0.0.1:6379 and
# RabbitMQ on 127.0.0.1:5672 (guest/guest). Installs them from Debian if they are missing,
# starts them if they are not answering.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_rabbitmq() {
  port_open 5672 && return 0
  if ! command -v rabbitmq-server >/dev/null; then
    echo "installing rabbitmq-server from Debian" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq rabbitmq-server >&2
  fi
  if ! port_open 5672; then
    if rabbitmqctl -q ping >/dev/null 2>&1; then
      # The node runs but its application is stopped (a test stops it to show unreadiness;
      # a run killed before it restarted it leaves it so): starting a second node would fail.
      echo "RabbitMQ node up with its application stopped: start_app" >&2
      rabbitmqctl start_app >&2 || true
    else
      rabbitmq-server -detached >&2 || service rabbitmq-server start >&2 || true
    fi
  fi
  for _ in $(seq 1 600); do
    port_open 5672 && rabbitmqctl await_startup >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "RabbitMQ did not start on 127.0.0.1:5672" >&2
  return 1
}
ensure_rabbitmq

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
