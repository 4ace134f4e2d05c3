"""What the prodcat DAGs share: the config path, params, default arguments and the write-back
sensor's limits. DAG files import this at parse time, so it imports nothing heavy."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Dict

import pendulum
from airflow.sdk import Param

from core.config import LOCAL_BEAM_RUNNER, Publish

CONFIG_PATH = str(Path(__file__).resolve().parents[1] / "feature_config.yaml")
START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")


def run_params() -> Dict[str, Param]:
    """Params of every DAG that runs stages (read by :func:`entrypoints.airflow_entry.run_settings`);
    new ones per DAG, as a DAG owns its params."""
    return {
        "beam_runner": Param(
            LOCAL_BEAM_RUNNER,
            type="string",
            enum=[LOCAL_BEAM_RUNNER, "DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner"],
            description="Beam runner for preprocessing and neighbours.",
        ),
        "beam_options": Param([], type="array", items={"type": "string"}, description="Extra Beam flags, e.g. --project=..."),
        "data_root": Param(
            None, type=["null", "string"], description="Run folders root (local path or gs://); default: variable prodcat_data_root."
        ),
    }


def default_args(execution_timeout: timedelta) -> Dict[str, Any]:
    """Every prodcat task: two retries with exponential backoff, and at most ``execution_timeout`` a try."""
    return {
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "execution_timeout": execution_timeout,
    }


def operations_dag_args() -> Dict[str, Any]:
    """``@dag`` arguments of the manual operations DAGs (replay, label import): triggered by hand
    with params, one run at a time, an hour a task."""
    return {
        "schedule": None,
        "start_date": START_DATE,
        "catchup": False,
        "max_active_runs": 1,
        "tags": ["prodcat", "operations"],
        "default_args": default_args(execution_timeout=timedelta(hours=1)),
    }


def wait_indexed_limits(publish: Publish) -> Dict[str, Any]:
    """Arguments of a ``wait_indexed`` sensor, from the config's publish settings (as the CLI's
    ``wait_indexed`` uses them): it pokes every ``reconcile_poke_s`` without holding a worker slot and
    fails after ``reconcile_timeout_s``. A poke may take no longer than the whole wait (the DAG's
    default ``execution_timeout`` is meant for the stages)."""
    return {
        "mode": "reschedule",
        "poke_interval": publish.reconcile_poke_s,
        "timeout": publish.reconcile_timeout_s,
        "execution_timeout": timedelta(seconds=publish.reconcile_timeout_s),
    }
