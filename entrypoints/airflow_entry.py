"""The Airflow entry point of prodcat's tasks: reads params, connections and variables of
the running task and calls :mod:`entrypoints.tasks`. Imported only inside tasks."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from datetime import UTC, datetime, timedelta
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from core.config import LOCAL_BEAM_RUNNER
from entrypoints.assets import PREDICTIONS_URI
from entrypoints.tasks import RunSettings
from services.publish import RabbitConnection
from services.search_index import EsConnection

ES_CONN_ID = "prodcat_elasticsearch"
RABBIT_CONN_ID = "prodcat_rabbitmq"
GCP_CONN_ID = "prodcat_google_cloud"
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


def _gcp_field(conn: Any, name: str) -> Optional[str]:
    extra = conn.extra_dejson if conn.extra else {}
    # the Google provider's field names, with or without its old "extra__google_cloud_platform__" prefix
    return extra.get(name) or extra.get(f"extra__google_cloud_platform__{name}")


def google_cloud_env(conn: Any, secrets_dir: str) -> Dict[str, str]:
    """Environment for Google's client libraries (google-cloud-storage, Beam's ``gs://`` filesystem,
    Dataflow) from a Google Cloud connection: its key file (``key_path``, or ``keyfile_dict`` written
    owner-only under ``secrets_dir``) and ``project``. No key: Application Default Credentials."""
    env = {}
    project = _gcp_field(conn, "project")
    if project:
        env["GOOGLE_CLOUD_PROJECT"] = project
    key_path = _gcp_field(conn, "key_path")
    keyfile = _gcp_field(conn, "keyfile_dict")
    if keyfile:
        key_path = os.path.join(secrets_dir, "google_credentials.json")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(keyfile if isinstance(keyfile, str) else json.dumps(keyfile))
    if key_path:
        env["GOOGLE_APPLICATION_CREDENTIALS"] = key_path
    return env


@contextlib.contextmanager
def google_cloud_credentials() -> Iterator[Optional[str]]:
    """The ``prodcat_google_cloud`` connection's credentials in this task's environment while it
    runs (Beam workers it starts inherit them); yields its project. Nothing where there is no such
    connection (yields None)."""
    conn = _connection(GCP_CONN_ID)
    if conn is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="prodcat-gcp-") as secrets_dir:
        env = google_cloud_env(conn, secrets_dir)
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            yield _gcp_field(conn, "project")
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def beam_arguments(params: Mapping[str, Any], project: Optional[str]) -> Tuple[str, ...]:
    """Runner flag and options from the params; Dataflow gets the connection's project unless given."""
    runner = params.get("beam_runner") or LOCAL_BEAM_RUNNER
    options = list(params.get("beam_options") or [])
    if runner == "DataflowRunner" and project and not any(o.startswith("--project") for o in options):
        options.append(f"--project={project}")
    return (f"--runner={runner}", *options)


def run_settings(context: Mapping[str, Any], config_path: str, project: Optional[str]) -> RunSettings:
    """The task's :class:`RunSettings` from its Airflow context and Google Cloud ``project``."""
    from airflow.sdk import Variable

    params = context["params"]
    run = context["dag_run"]
    # an asset-triggered run has no logical date
    when = context.get("logical_date") or run.run_after
    data_root = params.get("data_root") or Variable.get(DATA_ROOT_VARIABLE, default=os.path.join(os.path.expanduser("~"), "prodcat-data"))
    beam_args = beam_arguments(params, project)
    return RunSettings(
        data_root=data_root,
        run_id=run.run_id,
        dag_id=run.dag_id,
        version=int(when.timestamp()),
        config_path=config_path,
        es=es_connection(),
        rabbit=rabbit_connection(),
        beam_args=beam_args,
        model_type=params.get("model_type") or None,
        limit=params.get("limit"),
        categories=tuple(params.get("categories") or ()),
        force_publish=bool(params.get("force_publish")),
    )


def run_task(name: str, config_path: str, *paths: str) -> Any:
    """Runs stage ``name`` of :data:`entrypoints.tasks.TASKS` for the current Airflow task."""
    from airflow.sdk import get_current_context

    from entrypoints import tasks

    with google_cloud_credentials() as project:
        return tasks.TASKS[name](run_settings(get_current_context(), config_path, project), *paths)


def poke_indexed(config_path: str, publish_dir: str) -> Any:
    """One poke of a ``wait_indexed`` sensor: a check of :func:`entrypoints.tasks.check_indexed`, its
    state kept per task try; done with the ``indexed`` folder as XCom once every update arrived."""
    from airflow.sdk import get_current_context

    from entrypoints import tasks

    context = get_current_context()
    with google_cloud_credentials() as project:
        settings = run_settings(context, config_path, project)
        out, sooner_s = tasks.check_indexed(settings, publish_dir, f"try-{context['ti'].try_number}")
    return poke_result(out, sooner_s, datetime.now(UTC))


def poke_result(out: Optional[str], sooner_s: Optional[float], now: datetime) -> Any:
    """The sensor's answer to a check: done, not yet (the next poke after the sensor's interval), or
    not yet but due sooner: a reschedule at that time, raised as Airflow's sensors raise it (that poke
    skips the sensor's timeout check, which the next regular poke makes)."""
    from airflow.sdk import PokeReturnValue
    from airflow.sdk.exceptions import AirflowRescheduleException

    if out is None and sooner_s is not None:
        raise AirflowRescheduleException(now + timedelta(seconds=sooner_s))
    return PokeReturnValue(is_done=out is not None, xcom_value=out)


def run_replay(config_path: str) -> Dict[str, int]:
    """The dead-letter replay DAG's task: replays the dead letters its params select."""
    from airflow.sdk import get_current_context

    from entrypoints import tasks

    context = get_current_context()
    params = context["params"]
    settings = run_settings(context, config_path, None)
    return tasks.replay_dead_letters(settings, params.get("run_id") or None, params.get("reason_contains") or None)


def run_import_labels(config_path: str) -> str:
    """The label-import DAG's task: imports the CSV its ``csv_path`` param names; returns the
    stage folder with the counts and bad rows."""
    from airflow.sdk import get_current_context

    from entrypoints import tasks

    context = get_current_context()
    with google_cloud_credentials() as project:
        return tasks.import_labels(run_settings(context, config_path, project), context["params"]["csv_path"])


def predictions_folders(context: Mapping[str, Any]) -> Tuple[str, str]:
    """``(preprocess_dir, predict_dir)`` of the predictions to find neighbours for: the params
    of a manual trigger, else the newest triggering event of the predictions asset."""
    params = context["params"]
    if params.get("predict_dir") and params.get("preprocess_dir"):
        return params["preprocess_dir"], params["predict_dir"]
    from airflow.sdk import Asset

    events = list(context["triggering_asset_events"].get(Asset(PREDICTIONS_URI), []))
    if not events:
        raise ValueError(
            "no predictions to use: trigger with params predict_dir and preprocess_dir, "
            f"or let an update of {PREDICTIONS_URI} start this DAG"
        )
    extra = max(events, key=lambda e: e.timestamp).extra
    return extra["preprocess_dir"], extra["predict_dir"]


def run_neighbours(config_path: str) -> str:
    """The visual-similarity DAG's neighbours task."""
    from airflow.sdk import get_current_context

    from entrypoints import tasks

    context = get_current_context()
    with google_cloud_credentials() as project:
        return tasks.neighbours(run_settings(context, config_path, project), *predictions_folders(context))
