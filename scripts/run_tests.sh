#!/usr/bin/env bash
# Sets up and runs the test suite (tests start the services they need).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/services.sh" start
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
