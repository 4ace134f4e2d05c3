"""Airflow as users run it: `airflow standalone` (API server, scheduler, DAG processor, triggerer)
with the real local services; DAG runs triggered through the REST API and the UI, a middle task
cleared and rerun, invalid params refused."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from elasticsearch import helpers

from entrypoints.cli import airflow_env
from services.search_index import EsConnection
from trainer.predict import read_predictions

from conftest import REPO

pytestmark = pytest.mark.e2e

DAG_ID = "prodcat_categorise"
UPDATE_FIELDS = (
    "predicted_categories",
    "predicted_attributes",
    "decided_by",
    "fewshot_match",
    "model_version",
    "prediction_version",
    "prodcat_run_id",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """standalone's components outlive its own exit: the whole group goes, by force after a grace period."""
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(grace_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class Airflow:
    """A running `airflow standalone` and a REST client for it."""

    def __init__(self, base: str, data_root: Path, log: Path):
        self.base, self.data_root, self.log = base, data_root, log
        self.session = requests.Session()

    def authenticate(self) -> None:
        token = self.session.get(f"{self.base}/auth/token", timeout=10).json()["access_token"]
        self.session.headers["Authorization"] = f"Bearer {token}"

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.session.request(method, f"{self.base}/api/v2{path}", timeout=30, **kwargs)

    def trigger(self, conf: dict) -> requests.Response:
        return self.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})

    def runs(self) -> list:
        return self.api("GET", f"/dags/{DAG_ID}/dagRuns").json()["dag_runs"]

    def task_states(self, run_id: str) -> dict:
        tis = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
        return {ti["task_id"]: (ti["state"], ti["try_number"]) for ti in tis}

    def wait_for_success(self, run_id: str, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]
            if state == "success":
                return
            if state == "failed":
                break
            time.sleep(3)
        raise AssertionError(f"run {run_id} did not succeed: {self.task_states(run_id)}; log tail:\n{self.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, es_url, rabbit_vhost, image_server, fashion_slice):
    work = tmp_path_factory.mktemp("airflow-live")
    common = [sys.executable, "-m", "entrypoints.cli", "--es-url", es_url, "--rabbit-vhost", rabbit_vhost.virtual_host]
    subprocess.run(common + ["seed", "--catalogue", str(fashion_slice), "--image-base-url", image_server], check=True, cwd=REPO)
    consumer = subprocess.Popen(common + ["consume"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    env = airflow_env(work / "airflow", str(work / "data"), es_url, "127.0.0.1", 5672)
    env.update(
        {
            "AIRFLOW_CONN_PRODCAT_RABBITMQ": json.dumps(
                {
                    "conn_type": "generic",
                    "host": "127.0.0.1",
                    "port": 5672,
                    "login": "guest",
                    "password": "guest",
                    "schema": rabbit_vhost.virtual_host,
                }
            ),
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            # manual runs only: the weekly schedule would otherwise start a run of its own on unpausing
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        }
    )
    log = work / "standalone.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "standalone"],
            env=env,
            cwd=work,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = Airflow(f"http://127.0.0.1:{port}", work / "data", log)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                client.authenticate()
                if client.api("GET", f"/dags/{DAG_ID}").status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"Airflow did not come up; log tail:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield client
    finally:
        stop_process_group(proc)
        consumer.terminate()
        consumer.wait(timeout=60)


def snapshot(es, run_folder: Path) -> dict:
    """What a run leaves behind: its predictions and evaluation, and the updates in Elasticsearch."""
    es.indices.refresh(index="products")
    docs = {
        h["_id"]: {f: h["_source"].get(f) for f in UPDATE_FIELDS}
        for h in helpers.scan(es, index="products", query={"query": {"match_all": {}}})
    }
    metrics = json.loads((run_folder / "evaluation" / "metrics.json").read_text())
    return {
        "predictions": sorted(read_predictions(str(run_folder / "predict")), key=lambda p: p["id"]),
        "metrics": {k: v for k, v in metrics.items() if k in ("rule_labels", "ground_truth")},
        "documents": docs,
    }


def test_rest_trigger_then_clearing_training_reruns_it_and_downstream_to_the_same_result(airflow, es_url):
    response = airflow.trigger({"model_type": "linear"})
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]
    airflow.wait_for_success(run_id)
    (run_folder,) = (airflow.data_root / "runs" / DAG_ID).iterdir()
    es = EsConnection(url=es_url).client()
    first = snapshot(es, run_folder)
    assert len(first["predictions"]) == 400
    assert all(d["prodcat_run_id"] == run_id for d in first["documents"].values())

    events = airflow.api("GET", "/assets/events", params={"source_dag_id": DAG_ID}).json()["asset_events"]
    assert [e["extra"]["predict_dir"] for e in events] == [str(run_folder / "predict")]

    cleared = airflow.api(
        "POST",
        f"/dags/{DAG_ID}/clearTaskInstances",
        json={"dry_run": False, "dag_run_id": run_id, "task_ids": ["train"], "include_downstream": True, "only_failed": False},
    )
    assert cleared.status_code == 200, cleared.text
    assert sorted(ti["task_id"] for ti in cleared.json()["task_instances"]) == [
        "evaluate",
        "predict",
        "publish",
        "report",
        "train",
        "wait_indexed",
        "write_review",
    ]
    deadline = time.monotonic() + 60
    while airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"] == "success" and time.monotonic() < deadline:
        time.sleep(1)
    airflow.wait_for_success(run_id)
    tries = airflow.task_states(run_id)
    assert tries["train"][1] == 2 and tries["predict"][1] == 2 and tries["dump"][1] == 1 and tries["preprocess"][1] == 1
    assert snapshot(es, run_folder) == first
    assert sorted(p.name for p in (airflow.data_root / "runs" / DAG_ID).iterdir()) == [run_folder.name]


@pytest.mark.parametrize(
    "conf, named", [({"model_type": "xgboost"}, "model_type"), ({"limit": -5}, "limit"), ({"categories": "Apparel"}, "categories")]
)
def test_invalid_params_are_refused_before_any_run_exists(airflow, conf, named):
    before = len(airflow.runs())
    response = airflow.trigger(conf)
    assert response.status_code == 400 and named in response.text
    assert len(airflow.runs()) == before


def test_ui_triggers_a_run_with_a_parameter_from_the_form(airflow, artifacts_dir):
    from playwright.sync_api import expect, sync_playwright

    before = {r["dag_run_id"] for r in airflow.runs()}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{airflow.base}/auth/token/login?next=/dags/{DAG_ID}")
        page.get_by_role("button", name="Trigger Dag").click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_text("Run Parameters")).to_be_visible()
        dialog.locator("input[name=element_limit]").fill("50")
        dialog.get_by_role("button", name="Trigger").click()
        deadline = time.monotonic() + 60
        while not ({r["dag_run_id"] for r in airflow.runs()} - before) and time.monotonic() < deadline:
            time.sleep(1)
        (new,) = [r for r in airflow.runs() if r["dag_run_id"] not in before]
        page.goto(f"{airflow.base}/dags/{DAG_ID}/runs")
        expect(page.get_by_text(new["dag_run_id"]).first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(artifacts_dir / "airflow_ui_triggered_run.png"), full_page=True)
        browser.close()
    assert new["conf"]["limit"] == 50 and new["run_type"] == "manual"
    airflow.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{new['dag_run_id']}", json={"state": "failed"})  # not needed further
