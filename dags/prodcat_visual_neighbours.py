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

from airflow.sdk import Asset, Param, PokeReturnValue, dag, task

from core.config import load_config
from entrypoints.assets import PREDICTIONS_URI
from entrypoints.dag_defaults import CONFIG_PATH, START_DATE, default_args, run_params, wait_indexed_limits

WAIT_INDEXED = wait_indexed_limits(load_config(CONFIG_PATH).publish)

PARAMS = {
    "predict_dir": Param(
        None, type=["null", "string"], description="A categorisation run's predict folder; default: the triggering asset event's."
    ),
    "preprocess_dir": Param(
        None, type=["null", "string"], description="The same run's preprocess folder; default: the triggering asset event's."
    ),
    **run_params(),
}


@dag(
    dag_id="prodcat_visual_neighbours",
    schedule=[Asset(PREDICTIONS_URI)],
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    tags=["prodcat", "similarity"],
    params=PARAMS,
    doc_md=__doc__,
    default_args=default_args(execution_timeout=timedelta(hours=4)),
)
def prodcat_visual_neighbours():
    @task
    def neighbours() -> str:
        from entrypoints.airflow_entry import run_neighbours

        return run_neighbours(CONFIG_PATH)

    @task
    def publish(neighbours_dir: str) -> str:
        from entrypoints.airflow_entry import run_task

        return run_task("publish_neighbours", CONFIG_PATH, neighbours_dir)

    @task.sensor(**WAIT_INDEXED)
    def wait_indexed(publish_dir: str) -> PokeReturnValue:
        """Waits, without holding a worker slot, until the consumer wrote every update; re-publishes
        what went missing (pipelines.writeback)."""
        from entrypoints.airflow_entry import poke_indexed

        return poke_indexed(CONFIG_PATH, publish_dir)

    @task
    def report() -> str:
        """The run's HTML report (``<run folder>/report/index.html``); the Airflow UI shows it in a
        "Run report" tab of the DAG run (entrypoints.airflow_plugin)."""
        from entrypoints.airflow_entry import run_task

        return run_task("report", CONFIG_PATH)

    wait_indexed(publish(neighbours())) >> report()


prodcat_visual_neighbours()
