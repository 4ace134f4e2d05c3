"""End to end: seed the in-repo slice, run the whole DAG (``airflow dags test``) with a consumer
against the real local services, then check Elasticsearch document by document."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from elasticsearch import helpers

from pipelines.cli import airflow_env, run_dags
from pipelines.neighbours import read_neighbours
from pipelines.search_index import EsConnection

from conftest import REPO


def all_docs(es, index):
    es.indices.refresh(index=index)
    return {h["_id"]: h["_source"] for h in helpers.scan(es, index=index, query={"query": {"match_all": {}}})}


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory, es_url, rabbit_vhost, image_server, fashion_slice):
    work = tmp_path_factory.mktemp("e2e")
    common = [sys.executable, "-m", "pipelines.cli", "--es-url", es_url, "--rabbit-vhost", rabbit_vhost.virtual_host]
    subprocess.run(common + ["seed", "--catalogue", str(fashion_slice), "--image-base-url", image_server], check=True, cwd=REPO)
    es = EsConnection(url=es_url).client()
    before = all_docs(es, "products")
    consumer = subprocess.Popen(common + ["consume"], cwd=REPO)
    try:
        env = airflow_env(work / "airflow", str(work / "data"), es_url, "127.0.0.1", 5672)
        env["AIRFLOW_CONN_PRODCAT_RABBITMQ"] = json.dumps(
            {"conn_type": "generic", "host": "127.0.0.1", "port": 5672, "login": "guest", "password": "guest", "schema": rabbit_vhost.virtual_host})
        run_dir, neighbours_run_dir = run_dags(env, str(work / "data"), {"model_type": "ffn"}, "2026-11-22T00:00:00+00:00")
    finally:
        consumer.terminate()
        consumer.wait(timeout=120)
    return {"es": es, "before": before, "after": all_docs(es, "products"), "run_dir": run_dir, "neighbours_run_dir": neighbours_run_dir}


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


def test_visual_neighbours_come_from_the_products_own_second_level_category(dag_run):
    after = dag_run["after"]
    groups = {r["id"]: r["group"] for r in read_neighbours(str(dag_run["neighbours_run_dir"] / "neighbours"))}
    with_neighbours = 0
    for pid, doc in after.items():
        neighbours = doc["visual_neighbours"]
        assert len(neighbours) <= 100
        if not doc.get("image_url"):
            assert neighbours == []
            continue
        with_neighbours += bool(neighbours)
        assert groups[pid] is not None and groups[pid].count(" > ") == 1
        for n in neighbours:
            assert n["id"] != pid and n["id"] in after and groups[n["id"]] == groups[pid]
        scores = [n["score"] for n in neighbours]
        assert scores == sorted(scores, reverse=True)
    assert with_neighbours >= 300
    assert max(len(d["visual_neighbours"]) for d in after.values()) == 100


def test_nothing_else_on_the_document_was_lost(dag_run):
    added = {"predicted_categories", "predicted_attributes", "model_version", "prediction_version", "prodcat_run_id",
             "visual_neighbours", "neighbours_version", "neighbours_run_id"}
    for pid, before in dag_run["before"].items():
        after = dag_run["after"][pid]
        assert {k: v for k, v in after.items() if k not in added} == before


def test_exported_model_serves_raw_inputs_without_the_transform_folder(dag_run, tmp_path):
    from pipelines.config import load_config
    from pipelines.preprocess import read_clean_rows
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
    subprocess.run([sys.executable, "-c", code, str(model_dir), str(tmp_path / "raw.npy"), str(tmp_path / "out.npy")],
                   check=True, cwd=REPO)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-6)


def test_evaluation_recorded_in_file_and_elasticsearch(dag_run):
    metrics = json.loads((dag_run["run_dir"] / "evaluation" / "metrics.json").read_text())
    for against in ("rule_labels", "ground_truth"):
        assert set(metrics[against]["levels"]) == {"1", "2", "3"}
        assert {"precision_at_1", "recall_at_5", "hierarchical_f1"} <= set(metrics[against])
    doc = dag_run["es"].get(index="prodcat-model-metrics", id=dag_run["run_dir"].name)["_source"]
    assert doc["ground_truth"]["hierarchical_f1"] == metrics["ground_truth"]["hierarchical_f1"]
