#!/usr/bin/env bash
# Sets up a fresh Debian machine for prodcat: system packages (RabbitMQ, Chromium for UI
# tests), a Python 3.11 venv with the pinned packages, and prodcat itself (editable).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PRODCAT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

missing=()
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
command -v chromium >/dev/null || missing+=(chromium)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${missing[@]}" >/dev/null
fi

stamp="$VENV/.prodcat-requirements"
want="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/requirements.lock" | sha256sum)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r "$ROOT/requirements-dev.txt" -c "$ROOT/requirements.lock"
  echo "$want" > "$stamp"
fi
"$VENV/bin/pip" install -q --no-deps -e "$ROOT" 2>/dev/null
"$VENV/bin/pip" check
