#!/usr/bin/env bash
# Airflow on localhost with prodcat's DAGs, connections and services: UI at http://127.0.0.1:8080
# (user admin; the generated password is printed by Airflow and kept in
# .prodcat/airflow/simple_auth_manager_passwords.json.generated).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/services.sh" start
export AIRFLOW_HOME="$ROOT/.prodcat/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW_VAR_PRODCAT_DATA_ROOT="${PRODCAT_DATA_ROOT:-$ROOT/.prodcat/data}"
export AIRFLOW_CONN_PRODCAT_ELASTICSEARCH='{"conn_type": "generic", "host": "127.0.0.1", "port": 9200}'
export AIRFLOW_CONN_PRODCAT_RABBITMQ='{"conn_type": "generic", "host": "127.0.0.1", "port": 5672, "login": "guest", "password": "guest"}'
export PATH="$ROOT/.venv/bin:$PATH"   # standalone spawns `airflow`
"$ROOT/.venv/bin/prodcat" consume &
trap 'kill %1 2>/dev/null || true' EXIT
airflow standalone
