#!/usr/bin/env bash
# The main job on local defaults: set up, start the services, seed the in-repo catalogue
# slice, run the whole DAG with a consumer, print what happened.
#   PRODCAT_CATALOGUE=../shared/data/fashion scripts/run_main.sh   # the full catalogue
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/services.sh" start
cd "$ROOT"
exec "$ROOT/.venv/bin/prodcat" demo --catalogue "${PRODCAT_CATALOGUE:-$ROOT/data/fashion_slice}" "$@"
