"""Airflow as users run it: the components started for real, the DAG triggered through the REST API
with parameters, a middle task cleared and rerun with everything downstream (same artifacts, same
documents), invalid parameters refused, and the UI driven in headless Chromium."""
import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from elasticsearch import helpers

from pipelines.cli import airflow_env
from pipelines.search_index import EsConnection

from conftest import REPO

DAG_ID = "prodcat_categorise"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, es_url, rabbit_vhost, image_server, fashion_slice):
    work = tmp_path_factory.mktemp("airflow-live")
    port = free_port()
    common = [sys.executable, "-m", "pipelines.cli", "--es-url", es_url, "--rabbit-vhost", rabbit_vhost.virtual_host]
    subprocess.run(common + ["seed", "--catalogue", str(fashion_slice), "--image-base-url", image_server], check=True, cwd=REPO)
    env = airflow_env(work / "airflow", str(work / "data"), es_url, "127.0.0.1", 5672)
    env.update({
        "AIRFLOW_CONN_PRODCAT_RABBITMQ": json.dumps({"conn_type": "generic", "host": "127.0.0.1", "port": 5672, "login": "guest",
                                                     "password": "guest", "schema": rabbit_vhost.virtual_host}),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
    })
    log = open(work / "airflow.log", "wb")
    server = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "standalone"], env=env, cwd=work,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    consumer = subprocess.Popen(common + ["consume"], cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/api/v2/dags/{DAG_ID}", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, (work / "airflow.log").read_text()[-3000:]
            time.sleep(2)
        else:
            raise AssertionError("Airflow did not serve the DAG in time:\n" + (work / "airflow.log").read_text()[-3000:])
        yield {"base": base, "data": work / "data", "es": EsConnection(url=es_url).client(), "work": work}
    finally:
        consumer.terminate()
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
        consumer.wait(timeout=60)
        log.close()


def trigger(airflow, conf, logical_date):
    return requests.post(f"{airflow['base']}/api/v2/dags/{DAG_ID}/dagRuns",
                         json={"logical_date": logical_date, "conf": conf}, timeout=30)


def wait_run(airflow, run_id, timeout=900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = requests.get(f"{airflow['base']}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", timeout=30).json()["state"]
        if state in ("success", "failed"):
            return state
        time.sleep(3)
    raise AssertionError(f"run {run_id} did not finish in {timeout}s")


def snapshot(run_dir: Path, es) -> dict:
    """What a rerun must reproduce: predictions, neighbours, metrics, and the documents."""
    def lines(pattern):
        out = set()
        for path in sorted(run_dir.glob(pattern)):
            out |= set(gzip.open(path).read().splitlines())
        return hashlib.sha256(b"\n".join(sorted(out))).hexdigest()

    es.indices.refresh(index="products")
    docs = {h["_id"]: h["_source"] for h in helpers.scan(es, index="products", query={"query": {"match_all": {}}})}
    return {
        "predictions": lines("predict/predictions.jsonl.gz"),
        "neighbours": lines("neighbours/neighbours-*.jsonl.gz"),
        "metrics": json.loads((run_dir / "evaluation" / "metrics.json").read_text()),
        "thresholds": json.loads((run_dir / "model" / "model_card.json").read_text())["thresholds"],
        "documents": docs,
    }


def test_trigger_with_params_then_clear_a_middle_task_and_rerun_downstream(airflow):
    response = trigger(airflow, {"model_type": "linear", "limit": 1000}, "2026-11-23T00:00:00Z")
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]
    assert wait_run(airflow, run_id) == "success"
    (run_dir,) = [p for p in (airflow["data"] / "runs").iterdir() if p.is_dir()]
    card = json.loads((run_dir / "model" / "model_card.json").read_text())
    assert card["model"]["type"] == "linear"
    first = snapshot(run_dir, airflow["es"])
    assert len(first["documents"]) == 400
    assert all(d["prodcat_run_id"] == run_id for d in first["documents"].values())

    cleared = requests.post(f"{airflow['base']}/api/v2/dags/{DAG_ID}/clearTaskInstances", timeout=30, json={
        "dry_run": False, "dag_run_id": run_id, "task_ids": ["train"], "include_downstream": True,
        "include_upstream": False, "only_failed": False, "reset_dag_runs": True,
    })
    assert cleared.status_code == 200, cleared.text
    assert {t["task_id"] for t in cleared.json()["task_instances"]} == {
        "train", "evaluate", "predict", "neighbours", "publish", "wait_indexed"}
    time.sleep(5)
    assert wait_run(airflow, run_id) == "success"
    tries = requests.get(f"{airflow['base']}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", timeout=30).json()
    assert {t["task_id"]: t["try_number"] for t in tries["task_instances"]}["train"] == 2
    second = snapshot(run_dir, airflow["es"])
    assert second == first
    assert not list(run_dir.glob("*.tmp-*")) and not list(run_dir.glob("*.old-*"))


@pytest.mark.parametrize("conf, field", [({"model_type": "xgboost"}, "model_type"), ({"limit": -1}, "limit"),
                                         ({"force_publish": "yes"}, "force_publish")])
def test_invalid_params_are_refused_before_any_task_runs(airflow, conf, field):
    response = trigger(airflow, conf, None)
    assert response.status_code == 400, response.text
    assert field in response.text


def test_ui_triggers_the_dag_with_a_parameter_from_the_form(airflow, artifacts_dir):
    from playwright.sync_api import sync_playwright

    before = requests.get(f"{airflow['base']}/api/v2/dags/{DAG_ID}/dagRuns", timeout=30).json()["total_entries"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{airflow['base']}/dags/{DAG_ID}", wait_until="networkidle")
        page.get_by_role("button", name="Trigger").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Run Parameters").or_(dialog.get_by_text("Advanced Options")).first.wait_for()
        field = dialog.locator("#element_limit, [name='limit'], input[id*='limit']").first
        if field.count():
            field.fill("300")
        dialog.get_by_role("button", name="Trigger").last.click()
        page.wait_for_timeout(3000)
        page.screenshot(path=str(artifacts_dir / "airflow_ui_trigger.png"), full_page=True)
        browser.close()
    runs = requests.get(f"{airflow['base']}/api/v2/dags/{DAG_ID}/dagRuns", params={"order_by": "-run_after"}, timeout=30).json()
    assert runs["total_entries"] == before + 1
    assert runs["dag_runs"][0]["conf"].get("limit") == 300
