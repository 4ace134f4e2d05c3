"""The Airflow entry point of prodcat's tasks: reads params, connections and variables of
the running task and calls :mod:`pipelines.tasks`. Imported only inside tasks."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from pipelines.publish import RabbitConnection
from pipelines.search_index import EsConnection
from pipelines.tasks import RunSettings

ES_CONN_ID = "prodcat_elasticsearch"
RABBIT_CONN_ID = "prodcat_rabbitmq"
DATA_ROOT_VARIABLE = "prodcat_data_root"


def _connection(conn_id: str) -> Optional[Any]:
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import BaseHook

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


def es_connection() -> EsConnection:
    """From the ``prodcat_elasticsearch`` connection; the local default where there is none."""
    conn = _connection(ES_CONN_ID)
    if conn is None:
        return EsConnection()
    scheme = (conn.extra_dejson.get("scheme") or "http") if conn.extra else "http"
    return EsConnection(
        url=f"{scheme}://{conn.host}:{conn.port or 9200}",
        username=conn.login or None,
        password=conn.password or None,
        api_key=conn.extra_dejson.get("api_key") if conn.extra else None,
    )


def rabbit_connection() -> RabbitConnection:
    """From the ``prodcat_rabbitmq`` connection; the local default where there is none."""
    conn = _connection(RABBIT_CONN_ID)
    if conn is None:
        return RabbitConnection()
    return RabbitConnection(
        host=conn.host or "127.0.0.1",
        port=conn.port or 5672,
        username=conn.login or "guest",
        password=conn.password or "guest",
        virtual_host=conn.schema or "/",
    )


def run_settings(context: Mapping[str, Any], config_path: str) -> RunSettings:
    """The task's :class:`RunSettings` from its Airflow context."""
    from airflow.sdk import Variable

    params = context["params"]
    run = context["dag_run"]
    when = context.get("logical_date") or run.run_after
    data_root = params.get("data_root") or Variable.get(
        DATA_ROOT_VARIABLE, default=os.path.join(os.path.expanduser("~"), "prodcat-data")
    )
    beam_args = [f"--runner={params.get('beam_runner') or 'DirectRunner'}", *(params.get("beam_options") or [])]
    return RunSettings(
        data_root=data_root,
        run_id=run.run_id,
        version=int(when.timestamp()),
        config_path=config_path,
        es=es_connection(),
        rabbit=rabbit_connection(),
        beam_args=tuple(beam_args),
        model_type=params.get("model_type") or None,
        limit=params.get("limit"),
        categories=tuple(params.get("categories") or ()),
        force_publish=bool(params.get("force_publish")),
    )


def run_task(name: str, config_path: str, *paths: str) -> Any:
    """Runs :mod:`pipelines.tasks` function ``name`` for the current Airflow task."""
    from airflow.sdk import get_current_context

    from pipelines import tasks

    return getattr(tasks, name)(run_settings(get_current_context(), config_path), *paths)
