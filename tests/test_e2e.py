"""End to end: seed the in-repo slice, run the whole DAG (``airflow dags test``) with a consumer
against the real local services, then check Elasticsearch document by document."""

import contextlib
import gzip
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from elasticsearch import helpers

from entrypoints.cli import airflow_env, run_dags
from pipelines.neighbours import read_neighbours
from services.search_index import EsConnection

from conftest import REPO

pytestmark = pytest.mark.e2e


FLATS = "Footwear > Shoes > Flats"  # a category no rule emits
LABELLED_FLATS = ("16996", "10270", "20759", "17675")  # human labels imported before the run
UNLABELLED_FLATS = ("17007", "59052")  # "Rocia Women White Flats", "Carlton London Women ... Toned Flats"


def all_docs(es, index):
    es.indices.refresh(index=index)
    return {h["_id"]: h["_source"] for h in helpers.scan(es, index=index, query={"query": {"match_all": {}}})}


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory, es_url, rabbit_vhost, image_server, fashion_slice):
    work = tmp_path_factory.mktemp("e2e")
    common = [sys.executable, "-m", "entrypoints.cli", "--es-url", es_url, "--rabbit-vhost", rabbit_vhost.virtual_host]
    subprocess.run(common + ["seed", "--catalogue", str(fashion_slice), "--image-base-url", image_server], check=True, cwd=REPO)
    labels = work / "labels.csv"
    labels.write_text("id,category\n" + "".join(f"{pid},{FLATS}\n" for pid in LABELLED_FLATS) + "no-such-product,Footwear\n")
    imported = subprocess.run(common + ["labels", "import", str(labels)], cwd=REPO, capture_output=True, text=True)
    es = EsConnection(url=es_url).client()
    before = all_docs(es, "products")
    consumer = subprocess.Popen(common + ["consume"], cwd=REPO)
    try:
        env = airflow_env(work / "airflow", str(work / "data"), es_url, "127.0.0.1", 5672)
        env["AIRFLOW_CONN_PRODCAT_RABBITMQ"] = json.dumps(
            {
                "conn_type": "generic",
                "host": "127.0.0.1",
                "port": 5672,
                "login": "guest",
                "password": "guest",
                "schema": rabbit_vhost.virtual_host,
            }
        )
        # as the demo runs them: Airflow's output into a log file, one line per task printed
        with open(work / "airflow.log", "w") as log, contextlib.redirect_stdout(io.StringIO()) as printed:
            run_dir, neighbours_run_dir = run_dags(env, str(work / "data"), {"model_type": "ffn"}, "2026-11-22T00:00:00+00:00", log)
    finally:
        consumer.terminate()
        consumer.wait(timeout=120)
    return {
        "es": es,
        "before": before,
        "after": all_docs(es, "products"),
        "run_dir": run_dir,
        "neighbours_run_dir": neighbours_run_dir,
        "env": env,
        "printed": printed.getvalue().splitlines(),
        "log": work / "airflow.log",
        "imported": (imported.returncode, json.loads(imported.stdout)),
    }


def test_every_product_has_predictions_with_ancestors_and_scores(dag_run):
    after = dag_run["after"]
    assert len(after) == 400
    for pid, doc in after.items():
        cats = doc["predicted_categories"]
        assert cats, pid
        ids = {c["id"] for c in cats}
        for c in cats:
            assert 0.0 <= c["score"] <= 1.0
            parts = c["id"].split(" > ")
            assert all(" > ".join(parts[:i]) in ids for i in range(1, len(parts))), (pid, c["id"], ids)
        assert doc["model_version"] and doc["prediction_version"] > 0
        assert set(doc["predicted_attributes"]) == {"colour", "season", "usage"}


def test_human_labels_teach_a_category_no_rule_emits_without_retraining(dag_run):
    returncode, imported = dag_run["imported"]
    assert returncode == 1 and imported["products_updated"] == len(LABELLED_FLATS)  # the bad row is reported, the rest imported
    assert [(b["line"], b["reason"]) for b in imported["bad"]] == [(len(LABELLED_FLATS) + 2, "unknown_id")]
    after = dag_run["after"]
    for pid in LABELLED_FLATS:
        assert after[pid]["human_categories"] == [FLATS]
        assert FLATS in {c["id"] for c in after[pid]["predicted_categories"]}  # human labels are kept
    taught = [pid for pid in UNLABELLED_FLATS if FLATS in {c["id"] for c in after[pid]["predicted_categories"]}]
    assert taught
    # Elasticsearch says which classifier decided, and the category the few-shot classifier chose
    assert any(after[pid]["decided_by"] == "probe" for pid in taught)
    for pid in taught:
        if after[pid]["decided_by"] == "probe":
            match = after[pid]["fewshot_match"]
            assert match["classifier"] == "probe" and match["category"] == FLATS and match["decided"] and match["score"] > 0
    assert {after[pid]["decided_by"] for pid in LABELLED_FLATS} == {"human"}
    summary = json.loads((dag_run["run_dir"] / "predict" / "summary.json").read_text())
    assert summary["decided_by"].get("probe", 0) >= 1 and summary["human_prototypes"] == 1


def test_review_index_holds_the_runs_least_certain_products_with_reasons(dag_run):
    from core.config import load_config
    from trainer.review import REVIEW_FILE

    review = load_config(REPO / "feature_config.yaml").review
    with gzip.open(dag_run["run_dir"] / "predict" / REVIEW_FILE, "rt") as f:
        written = [json.loads(line) for line in f]
    es = dag_run["es"]
    es.indices.refresh(index=review.index)
    # this run's records: the index keeps earlier runs' too (and the test stand-in keeps its data between sessions)
    hits = list(helpers.scan(es, index=review.index, query={"query": {"term": {"run_id": written[0]["run_id"]}}}))
    assert 0 < len(hits) <= review.max_per_run
    assert {h["_source"]["product_id"] for h in hits} == {r["product_id"] for r in written}
    for hit in hits:
        doc = hit["_source"]
        assert hit["_id"] == f"{doc['run_id']}:{doc['product_id']}" and doc["product_id"] in dag_run["after"]
        assert doc["reason"] in ("uncertain", "few_examples") and doc["category"] and doc["guesses"]
    # flats has fewer human labels than review.few_examples_below: its nearest products are sent too
    assert {r["reason"] for h in hits for r in h["_source"]["reasons"]} == {"uncertain", "few_examples"}


def test_visual_neighbours_come_from_the_products_own_second_level_category(dag_run):
    after = dag_run["after"]
    records = list(read_neighbours(str(dag_run["neighbours_run_dir"] / "neighbours")))
    groups = {r["id"]: r["group"] for r in records}
    with_neighbours = 0
    for pid, doc in after.items():
        if not doc.get("image_url"):
            assert "visual_neighbours" not in doc  # an empty list is not sent where the document holds none
            continue
        stored = doc.get("visual_neighbours", {"ids": [], "scores": []})  # absent: alone in its group
        ids, scores = stored["ids"], stored["scores"]
        assert len(ids) == len(scores) <= 100
        with_neighbours += bool(ids)
        assert groups[pid] is not None and groups[pid].count(" > ") == 1
        for n in ids:
            assert n != pid and n in after and groups[n] == groups[pid]
        assert scores == sorted(scores, reverse=True)
    assert with_neighbours >= 300
    published = json.loads((dag_run["neighbours_run_dir"] / "publish" / "summary.json").read_text())
    assert published["unchanged"] == sum(not r["neighbours"] for r in records) > 0
    assert published["sent"] == len(records) - published["unchanged"]
    assert max(len(d.get("visual_neighbours", {}).get("ids", [])) for d in after.values()) == 100


def test_nothing_else_on_the_document_was_lost(dag_run):
    added = {
        "predicted_categories",
        "predicted_attributes",
        "decided_by",
        "fewshot_match",
        "model_version",
        "prediction_version",
        "prodcat_run_id",
        "prediction_publication",
        "visual_neighbours",
        "neighbours_version",
        "neighbours_run_id",
        "neighbours_publication",
    }
    for pid, before in dag_run["before"].items():
        after = dag_run["after"][pid]
        assert {k: v for k, v in after.items() if k not in added} == before


def test_exported_model_serves_raw_inputs_without_the_transform_folder(dag_run, tmp_path):
    from core.config import load_config
    from core.rows import read_clean_rows
    from trainer.serving import ServingModel, raw_batch

    run = dag_run["run_dir"]
    model_dir = tmp_path / "model"
    preprocess_dir = tmp_path / "preprocess"
    shutil.copytree(run / "model", model_dir)
    shutil.copytree(run / "preprocess", preprocess_dir)
    cfg = load_config(REPO / "feature_config.yaml")
    rows = list(read_clean_rows(str(preprocess_dir)))[:50]
    expected = ServingModel.load(str(model_dir)).predict(raw_batch(cfg, rows))["category_scores"]
    np.save(tmp_path / "raw.npy", raw_batch(cfg, rows), allow_pickle=True)
    shutil.rmtree(preprocess_dir / "transform_fn")
    code = (
        "import sys, numpy as np; import tensorflow_transform;"
        "from trainer.serving import ServingModel;"
        "raw = np.load(sys.argv[2], allow_pickle=True).item();"
        "np.save(sys.argv[3], ServingModel.load(sys.argv[1]).predict(raw)['category_scores'])"
    )
    subprocess.run([sys.executable, "-c", code, str(model_dir), str(tmp_path / "raw.npy"), str(tmp_path / "out.npy")], check=True, cwd=REPO)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-6)


def test_evaluation_recorded_in_file_and_elasticsearch(dag_run):
    metrics = json.loads((dag_run["run_dir"] / "evaluation" / "metrics.json").read_text())
    for against in ("rule_labels", "ground_truth"):
        assert set(metrics[against]["levels"]) == {"1", "2", "3"}
        assert {"precision_at_1", "recall_at_5", "hierarchical_f1"} <= set(metrics[against])
    doc = dag_run["es"].get(index="prodcat-model-metrics", id=dag_run["run_dir"].name)["_source"]
    assert doc["ground_truth"]["hierarchical_f1"] == metrics["ground_truth"]["hierarchical_f1"]


# What the Airflow UI does on a DAG run's page: list the plugins' external views through the API
# server, fill in the run's {DAG_ID}/{RUN_ID} and load the "Run report" tab's address.
UI_LINK = """
import json, sys, urllib.parse
from fastapi.testclient import TestClient
from airflow.api_fastapi.app import create_app
from airflow.models.dagrun import DagRun
from airflow.utils.session import create_session

client = TestClient(create_app())
plugins = client.get("/api/v2/plugins").json()["plugins"]
(view,) = [v for p in plugins if p["name"] == "prodcat" for v in p["external_views"]]
assert view["destination"] == "dag_run", view
out = {}
with create_session() as session:
    runs = {dag_id: session.query(DagRun).filter(DagRun.dag_id == dag_id).one().run_id for dag_id in sys.argv[2:]}
for dag_id, run_id in runs.items():
    href = view["href"].replace("{DAG_ID}", urllib.parse.quote(dag_id, safe="")).replace("{RUN_ID}", urllib.parse.quote(run_id, safe=""))
    response = client.get(href)
    out[dag_id] = {"href": href, "status": response.status_code, "html": response.text}
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


def test_report_written_for_both_runs_and_the_airflow_ui_link_resolves_to_it(dag_run, tmp_path):
    reports = {"prodcat_categorise": dag_run["run_dir"] / "report", "prodcat_visual_neighbours": dag_run["neighbours_run_dir"] / "report"}
    for folder in reports.values():
        assert (folder / "_SUCCESS").exists()
    categorisation = (reports["prodcat_categorise"] / "index.html").read_text(encoding="utf-8")
    assert 'id="levels-table"' in categorisation and 'id="category-table"' in categorisation and 'id="statistics"' in categorisation
    neighbours = (reports["prodcat_visual_neighbours"] / "index.html").read_text(encoding="utf-8")
    assert neighbours.count('<img src="data:image/jpeg;base64,') >= 8 * 5 and 'id="levels-table"' in neighbours

    env = {**dag_run["env"], "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"}
    subprocess.run([sys.executable, "-c", UI_LINK, str(tmp_path / "ui.json"), *reports], env=env, check=True, cwd=REPO)
    resolved = json.loads((tmp_path / "ui.json").read_text())
    for dag_id, folder in reports.items():
        assert resolved[dag_id]["href"].startswith(f"/prodcat/reports/{dag_id}/manual__")
        assert resolved[dag_id]["status"] == 200
        assert resolved[dag_id]["html"] == (folder / "index.html").read_text(encoding="utf-8")


def test_quiet_run_prints_one_line_per_task_and_logs_the_rest(dag_run):
    printed = dag_run["printed"]
    tasks = [line.split()[0] for line in printed if line.startswith("  ")]
    # write_review and publish both follow predict, in either order
    assert sorted(tasks[6:8]) == ["publish", "write_review"]
    tasks[6:8] = ["write_review", "publish"]
    assert tasks == [
        "dump",
        "preprocess",
        "validate_statistics",
        "train",
        "evaluate",
        "predict",
        "write_review",
        "publish",
        "wait_indexed",
        "report",
        "neighbours",
        "publish",
        "wait_indexed",
        "report",
    ]
    assert len(printed) == len(tasks) + 2 and all(line.endswith(" s") for line in printed if line.startswith("  "))
    assert next(line for line in printed if line.startswith("  dump")).split()[1:3] == ["400", "products,"]
    assert len(dag_run["log"].read_text().splitlines()) > 100  # Airflow's, TensorFlow's and Beam's output
