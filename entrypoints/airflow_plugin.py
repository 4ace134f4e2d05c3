"""The Airflow 3 UI's way to a run's report: a "Run report" tab on each DAG run page (an external
view) showing a small FastAPI app mounted in the API server at ``/prodcat``.

The app serves ``/prodcat/reports/{dag_id}/{run_id}``: the file that run's ``report`` task
returned (its XCom), read through :mod:`core.storage` (local or ``gs://``), for users allowed
to read the DAG's runs. Registered through the ``airflow.plugins`` entry point in ``setup.py``.
"""

from __future__ import annotations

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

URL_PREFIX = "/prodcat"
REPORT_TASK = "report"
# the UI fills in {DAG_ID} and {RUN_ID} (URI-encoded) on a DAG run's page
REPORT_HREF = URL_PREFIX + "/reports/{DAG_ID}/{RUN_ID}"

app = FastAPI(title="prodcat run reports")


def report_path(session: SessionDep, dag_id: str, run_id: str) -> str:
    """Where the run's ``report`` task wrote its report, from that task's return value."""
    from airflow.models.xcom import XComModel

    query = XComModel.get_many(run_id=run_id, key="return_value", task_ids=REPORT_TASK, dag_ids=dag_id, limit=1)
    row = session.scalars(query).first()
    if row is None:
        raise HTTPException(404, f"run {run_id!r} of {dag_id!r} has no report yet")
    return XComModel.deserialize_value(row)


@app.get("/reports/{dag_id}/{run_id}", response_class=HTMLResponse, dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))])
def run_report(dag_id: str, run_id: str, session: SessionDep) -> HTMLResponse:
    """The run's report page."""
    from core import storage

    path = report_path(session, dag_id, run_id)
    if not storage.exists(path):
        raise HTTPException(404, f"{path} is gone")
    with storage.open_read(path) as f:
        return HTMLResponse(f.read().decode("utf-8"))


class ProdcatPlugin(AirflowPlugin):
    """Run reports in the Airflow UI."""

    name = "prodcat"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "prodcat run reports"}]
    external_views = [{"name": "Run report", "href": REPORT_HREF, "destination": "dag_run", "url_route": "prodcat_report"}]
