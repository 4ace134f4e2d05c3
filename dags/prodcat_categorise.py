"""
### prodcat: categorise the catalogue

Dumps products from Elasticsearch, preprocesses them with Beam + TF Transform, checks the
data's statistics against the previous good run, trains a
multi-label model on the rule labels, evaluates it against rule labels and ground truth
(blessing gate), predicts every product (the prototype classifier adds the categories of human
labels over the model's embedding), writes the least certain products into the review index,
publishes the predictions to RabbitMQ and waits
until the consumer has written them back to Elasticsearch, then writes the run's HTML report
(the DAG run's "Run report" tab). New predictions update the asset
`prodcat://predictions`, which starts `prodcat_visual_neighbours`.

Each task writes only into its run's folder (`<data_root>/runs/<run_id>/<stage>`) and can
be cleared and rerun alone. Connections: `prodcat_elasticsearch`, `prodcat_rabbitmq`
(local defaults where missing); variable `prodcat_data_root`.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Asset, Param, PokeReturnValue, dag, task

from core.config import load_config
from entrypoints.assets import PREDICTIONS_URI
from entrypoints.dag_defaults import CONFIG_PATH, START_DATE, default_args, run_params, wait_indexed_limits

WAIT_INDEXED = wait_indexed_limits(load_config(CONFIG_PATH).publish)
PREDICTIONS = Asset(PREDICTIONS_URI)

PARAMS = {
    "model_type": Param("wide_deep", type="string", enum=["linear", "ffn", "wide_deep"], description="Model family to train."),
    "limit": Param(None, type=["null", "integer"], minimum=1, description="Dump at most this many products (trial runs)."),
    "categories": Param([], type="array", items={"type": "string"}, description="Only products under these category ids."),
    "force_publish": Param(False, type="boolean", description="Publish even if the model fails the blessing gate."),
    **run_params(),
}


@dag(
    dag_id="prodcat_categorise",
    schedule="@weekly",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    tags=["prodcat", "ml"],
    params=PARAMS,
    doc_md=__doc__,
    default_args=default_args(execution_timeout=timedelta(hours=6)),
)
def prodcat_categorise():
    @task
    def dump() -> str:
        from entrypoints.airflow_entry import run_task

        return run_task("dump", CONFIG_PATH)

    @task
    def preprocess(dump_dir: str) -> str:
        from entrypoints.airflow_entry import run_task

        return run_task("preprocess", CONFIG_PATH, dump_dir)

    @task
    def validate_statistics(preprocess_dir: str) -> str:
        from entrypoints.airflow_entry import run_task

        return run_task("validate_statistics", CONFIG_PATH, preprocess_dir)

    @task
    def train(preprocess_dir: str) -> str:
        from entrypoints.airflow_entry import run_task

        return run_task("train", CONFIG_PATH, preprocess_dir)

    @task
    def evaluate(model_dir: str, preprocess_dir: str) -> str:
        from entrypoints.airflow_entry import run_task

        return run_task("evaluate", CONFIG_PATH, model_dir, preprocess_dir)

    @task(outlets=[PREDICTIONS])
    def predict(evaluation_dir: str, preprocess_dir: str, *, outlet_events=None) -> str:
        from entrypoints.airflow_entry import run_task

        predict_dir = run_task("predict", CONFIG_PATH, evaluation_dir, preprocess_dir)
        outlet_events[PREDICTIONS].extra = {"predict_dir": predict_dir, "preprocess_dir": preprocess_dir}
        return predict_dir

    @task
    def write_review(predict_dir: str) -> str:
        """The run's least certain products into the review index (config review.*)."""
        from entrypoints.airflow_entry import run_task

        return run_task("write_review", CONFIG_PATH, predict_dir)

    @task
    def publish(predict_dir: str) -> str:
        from entrypoints.airflow_entry import run_task

        return run_task("publish_predictions", CONFIG_PATH, predict_dir)

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

    preprocessed = preprocess(dump())
    evaluated = evaluate(train(validate_statistics(preprocessed)), preprocessed)
    predicted = predict(evaluated, preprocessed)
    write_review(predicted)
    wait_indexed(publish(predicted)) >> report()


prodcat_categorise()
