"""
### prodcat: import human labels

Manual only. Imports a CSV of human labels (header `id,category`; category ids such as
`Footwear > Shoes > Flats`) into the products index as partial updates of `human_categories`:
a product's rows replace its human labels. Good rows are imported; each bad row (malformed,
unknown category, unknown product id) is reported with its line and reason in the run's
`import_labels/summary.json` and the task's XCom. The next categorisation run uses the labels:
they beat rule labels, and a category with a few of them is predicted by the prototype
classifier without retraining.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from entrypoints.dag_defaults import CONFIG_PATH, operations_dag_args

PARAMS = {
    "csv_path": Param(type="string", minLength=1, description="The CSV of labels (local path or gs://), header id,category."),
}


@dag(
    dag_id="prodcat_import_labels",
    params=PARAMS,
    doc_md=__doc__,
    **operations_dag_args(),
)
def prodcat_import_labels():
    @task
    def import_labels() -> str:
        from entrypoints.airflow_entry import run_import_labels

        return run_import_labels(CONFIG_PATH)

    import_labels()


prodcat_import_labels()
