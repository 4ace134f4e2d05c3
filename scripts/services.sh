#!/usr/bin/env bash
# Starts (or stops) the local services prodcat needs: the Elasticsearch stand-in (noida-db)
# and RabbitMQ. Idempotent: a service already answering is left alone.
#   scripts/services.sh start | stop | status
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PRODCAT_VENV:-$ROOT/.venv}"
ES_PORT="${PRODCAT_ES_PORT:-9200}"
NOIDA_DIR="$ROOT/.prodcat/noida"

es_up() { curl -fsS "http://127.0.0.1:$ES_PORT" >/dev/null 2>&1; }
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

# Daemons must not inherit the caller's descriptors: one started under `flock LOCK cmd` would
# hold the shared CPU lock for as long as it lives (RabbitMQ did, wedging every later job).
without_inherited_fds() {  # command...
  (
    for fd in /proc/self/fd/*; do
      fd="${fd##*/}"
      if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec "$@"
  )
}

wait_for() {  # name, check function, seconds
  for _ in $(seq 1 "$3"); do "$2" && return 0; sleep 1; done
  echo "$1 did not come up in $3 s" >&2; return 1
}

start() {
  mkdir -p "$NOIDA_DIR"
  if ! es_up; then
    without_inherited_fds "$VENV/bin/noida-db" up --data-dir "$NOIDA_DIR" --only elasticsearch --elasticsearch-port "$ES_PORT" >/dev/null 2>&1
    wait_for "Elasticsearch stand-in" es_up 60
  fi
  if ! rabbit_up; then
    without_inherited_fds rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_for RabbitMQ rabbit_up 120
    rabbitmqctl await_startup >/dev/null 2>&1 || true
  fi
  echo "services up: elasticsearch http://127.0.0.1:$ES_PORT, rabbitmq amqp://127.0.0.1:5672"
}

stop() {
  "$VENV/bin/noida-db" down --data-dir "$NOIDA_DIR" >/dev/null 2>&1 || true
  rabbitmqctl stop >/dev/null 2>&1 || true
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) es_up && echo "elasticsearch up" || echo "elasticsearch down"; rabbit_up && echo "rabbitmq up" || echo "rabbitmq down" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
