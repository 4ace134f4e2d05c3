"""
### prodcat: visual neighbours

Runs whenever the categorisation DAG produced new predictions (asset `prodcat://predictions`):
for every product, the top-k visually closest products within its second-level category
(ScaNN over the image embeddings), published through RabbitMQ into Elasticsearch's
`visual_neighbours`; then the run's HTML report with a neighbour gallery (the DAG run's
"Run report" tab).

The predictions to use come from the triggering asset event; a manual trigger names them
with the `predict_dir` and `preprocess_dir` params (folders of a categorisation run).
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Asset, Param, PokeReturnValue, dag, task

from pipelines.assets import PREDICTIONS_URI
from pipelines.config import load_config

CONFIG_PATH = str(Path(__file__).resolve().parents[1] / "feature_config.yaml")
PUBLISH = load_config(CONFIG_PATH).publish  # the sensor's pace and time limit

PARAMS = {
    "predict_dir": Param(None, type=["null", "string"], description="A categorisation run's predict folder; default: the triggering asset event's."),
    "preprocess_dir": Param(None, type=["null", "string"], description="The same run's preprocess folder; default: the triggering asset event's."),
    "beam_runner": Param(
        "DirectRunner", type="string", enum=["DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner"],
        description="Beam runner for the neighbours pipeline.",
    ),
    "beam_options": Param([], type="array", items={"type": "string"}, description="Extra Beam flags, e.g. --project=..."),
    "data_root": Param(None, type=["null", "string"], description="Run folders root (local path or gs://); default: variable prodcat_data_root."),
}


@dag(
    dag_id="prodcat_visual_neighbours",
    schedule=[Asset(PREDICTIONS_URI)],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["prodcat", "similarity"],
    params=PARAMS,
    doc_md=__doc__,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(hours=4),
    },
)
def prodcat_visual_neighbours():
    @task
    def neighbours() -> str:
        from pipelines.airflow_entry import run_neighbours

        return run_neighbours(CONFIG_PATH)

    @task
    def publish(neighbours_dir: str) -> str:
        from pipelines.airflow_entry import run_task

        return run_task("publish_neighbours", CONFIG_PATH, neighbours_dir)

    @task.sensor(poke_interval=PUBLISH.reconcile_poke_s, timeout=PUBLISH.reconcile_timeout_s, mode="reschedule")
    def wait_indexed(publish_dir: str) -> PokeReturnValue:
        """Waits, without holding a worker slot, until the consumer wrote every update; re-publishes
        what went missing (pipelines.writeback)."""
        from pipelines.airflow_entry import poke_indexed

        return poke_indexed(CONFIG_PATH, publish_dir)

    @task
    def report() -> str:
        """The run's HTML report (``<run folder>/report/index.html``); the Airflow UI shows it in a
        "Run report" tab of the DAG run (pipelines.airflow_plugin)."""
        from pipelines.airflow_entry import run_task

        return run_task("report", CONFIG_PATH)

    wait_indexed(publish(neighbours())) >> report()


prodcat_visual_neighbours()
