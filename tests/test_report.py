"""The run report: rendered by the ``report`` task from a categorisation run and a neighbours
run whose stage folders are written by prodcat's own writers where they are cheap (statistics
validation, evaluation scores and metrics, the blessing gate, atomic stages) around clean rows
of the in-repo slice; then opened in headless Chromium."""

import dataclasses
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import storage
from core.config import load_config
from core.taxonomy import CategoryTree
from entrypoints import tasks
from pipelines.preprocess import clean_parquet_schema, split_of
from pipelines.report import build, evaluation
from pipelines.statistics import previous_statistics, validate
from services.catalogue import RuleLabeller, product_documents
from trainer.evaluate import SCORES_FILE, bless, write_scores
from trainer.hierarchy import decide
from trainer.metrics import evaluate_predictions, truth_matrix

from conftest import REPO

pytestmark = pytest.mark.unit

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NEIGHBOURS_K = 10


def write_preprocess(cfg, run_dir, docs, tree, dead_letters):
    """A finished preprocess stage: clean Parquet rows, dead letters, categories, summary."""
    schema = clean_parquet_schema(cfg, [a.source for a in cfg.labels.attributes])
    rows = []
    for d in docs:
        row = {name: d.get(name) or "" for name in schema.names if pa.types.is_string(schema.field(name).type)}
        rows.append(
            {
                **row,
                "split": split_of(d["id"], "t", 50, 10),
                "rule_categories": tree.closure(d["rule_categories"]),
                "has_image": int(bool(d["image_url"])),
                "image_embedding": None,
                "image_error": "",
                "image_hash": "",
            }
        )
    with storage.atomic_stage(storage.join(run_dir, "preprocess")) as tmp:
        os.makedirs(storage.join(tmp, "clean"))
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), storage.join(tmp, "clean", "clean-00000-of-00001.parquet"))
        with storage.open_write(storage.join(tmp, "dead_letters", "dead-00000-of-00001.jsonl")) as f:
            f.write("".join(json.dumps(d) + "\n" for d in dead_letters).encode())
        storage.write_json(storage.join(tmp, "categories.json"), tree.to_records())
        counters = {"valid_test": len(rows), **{f"rejected_{d['reason']}": 1 for d in dead_letters}}
        storage.write_json(storage.join(tmp, "summary.json"), {"counters": counters, "categories": len(tree)})
    return storage.join(run_dir, "preprocess")


def write_model_and_evaluation(cfg, data_root, run_dir, docs, tree):
    """A model card, and an evaluation of a noisy model that mostly finds the true category."""
    rng = np.random.default_rng(0)
    truth = truth_matrix(tree, [[d["true_category"]] for d in docs])
    rules = truth_matrix(tree, [d["rule_categories"] for d in docs])
    raw = np.clip(0.55 * truth + rng.uniform(0, 0.7, truth.shape), 0, 1).astype(np.float32)
    thresholds = np.full(len(tree), 0.6, dtype=np.float32)
    model_dir = storage.join(run_dir, "model")
    history = {"categories_loss": [0.3, 0.2, 0.15], "val_categories_loss": [0.32, 0.25, 0.22]}
    with storage.atomic_stage(model_dir) as tmp:
        storage.write_json(
            storage.join(tmp, "model_card.json"),
            {
                "model_version": "r1",
                "run_id": "r1",
                "model": dataclasses.asdict(cfg.model),
                "config": dataclasses.asdict(cfg),
                "categories": tree.to_records(),
                "thresholds": thresholds.tolist(),
                "history": history,
                "train_examples_per_s": 1234.0,
            },
        )
    positive, closed = decide(raw, thresholds, tree)
    metrics = {
        "split": "test",
        "examples": len(docs),
        "model_version": "r1",
        "rule_labels": evaluate_predictions(closed, positive, rules, tree),
        "ground_truth": evaluate_predictions(closed, positive, truth, tree),
        "attributes": {"colour": {"accuracy": 0.8, "examples": len(docs)}},
    }
    evaluation_dir = storage.join(run_dir, "evaluation")
    with storage.atomic_stage(evaluation_dir) as tmp:
        write_scores(storage.join(tmp, SCORES_FILE), [d["id"] for d in docs], raw, thresholds, tree, rules, truth)
        storage.write_json(storage.join(tmp, "metrics.json"), metrics)
    decision = bless(metrics, cfg.model.blessing_metric, storage.join(data_root, "models", "blessed.json"), model_dir, False)
    storage.write_json(storage.join(evaluation_dir, "blessing.json"), decision)


def write_neighbours(run_dir, preprocess_dir, docs):
    """Each product's neighbours: products of the same level-2 true category first, then others."""
    with_image = [d for d in docs if d["image_url"]]
    group = {d["id"]: " > ".join(d["true_category"].split(" > ")[:2]) for d in with_image}
    records = []
    for d in with_image:
        others = sorted((o for o in with_image if o["id"] != d["id"]), key=lambda o: (group[o["id"]] != group[d["id"]], o["id"]))
        records.append(
            {
                "id": d["id"],
                "group": group[d["id"]],
                "neighbours": [{"id": o["id"], "score": round(0.95 - 0.02 * i, 3)} for i, o in enumerate(others[:NEIGHBOURS_K])],
            }
        )
    neighbours_dir = storage.join(run_dir, "neighbours")
    with storage.atomic_stage(neighbours_dir) as tmp:
        with gzip.open(storage.join(tmp, "neighbours-00000-of-00001.jsonl.gz"), "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        storage.write_json(
            storage.join(tmp, "summary.json"),
            {
                "counters": {"products_with_neighbours": len(records), "groups": len(set(group.values()))},
                "k": NEIGHBOURS_K,
                "group_level": 2,
                "preprocess_dir": preprocess_dir,
                "predict_dir": None,
            },
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_slice):
    """A previous good run, a categorisation run and a neighbours run on its predictions."""
    cfg = load_config(REPO / "feature_config.yaml")
    tree = CategoryTree.load_json(REPO / "data" / "fashion_categories.json")
    labeller = RuleLabeller.from_yaml(REPO / "data" / "labelling_rules.yaml", tree)
    docs = list(product_documents(fashion_slice, labeller, str(fashion_slice / "images"), limit=160))
    data_root = str(tmp_path_factory.mktemp("report"))
    dead = [{"reason": "invalid_json", "record": "{not json"}, {"reason": "missing_title", "record": '{"id": "7"}'}]

    previous = storage.run_dir(data_root, "prodcat_categorise", "r0")
    validate(cfg, write_preprocess(cfg, previous, docs[:140], tree, []), storage.join(previous, "statistics"), None, 1)
    run = storage.run_dir(data_root, "prodcat_categorise", "r1")
    preprocess_dir = write_preprocess(cfg, run, docs, tree, dead)
    validate(cfg, preprocess_dir, storage.join(run, "statistics"), previous_statistics(data_root, run), 2)
    write_model_and_evaluation(cfg, data_root, run, docs, tree)
    neighbours_run = storage.run_dir(data_root, "prodcat_visual_neighbours", "n1")
    write_neighbours(neighbours_run, preprocess_dir, docs)

    def report(dag_id, run_id):
        return tasks.report(
            tasks.RunSettings(data_root=data_root, run_id=run_id, version=2, dag_id=dag_id, config_path=str(REPO / "feature_config.yaml"))
        )

    return {
        "cfg": cfg,
        "tree": tree,
        "docs": docs,
        "run": run,
        "neighbours_run": neighbours_run,
        "report": report("prodcat_categorise", "r1"),
        "neighbours_report": report("prodcat_visual_neighbours", "n1"),
    }


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()


def test_neighbours_report_in_chromium_has_evaluation_plots_statistics_and_loaded_photos(runs, page, artifacts_dir):
    page.goto(f"file://{runs['neighbours_report']}")
    levels = page.locator("#levels-table tr")
    assert levels.count() == 4  # header + model vs truth, rules vs truth, model vs rules
    assert page.locator("#levels-table").inner_text().count("ground truth") == 2
    plots = page.locator("img.plot")
    assert plots.count() >= 4
    assert all(w > 0 for w in plots.evaluate_all("imgs => imgs.map(i => i.naturalWidth)"))
    statistics = page.locator("#statistics")
    assert statistics.is_visible() and "Compared with the run of version 1" in statistics.inner_text()
    assert "invalid_json" in page.locator("#dead-letters").inner_text()
    photos = page.locator(".gallery img")
    widths = photos.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert page.locator(".gallery-row").count() == 8 and len(widths) >= 8 * 5 and all(w > 0 for w in widths)
    assert page.locator(".gallery .missing").count() == 0
    page.screenshot(path=str(artifacts_dir / "report.png"), full_page=True)


def test_category_table_sorts_by_the_clicked_column(runs, page):
    page.goto(f"file://{runs['report']}")
    supports = lambda: [int(t) for t in page.locator("#category-table tbody td:nth-child(3)").all_inner_texts()]  # noqa: E731
    assert supports() == sorted(supports(), reverse=True)
    page.locator("#category-table th", has_text="F1").first.click()
    f1 = [float(t) for t in page.locator("#category-table tbody td:nth-child(7)").all_inner_texts()]
    assert f1 == sorted(f1, reverse=True) and f1 != sorted(f1)
    page.locator("#category-table th", has_text="support").click()
    page.locator("#category-table th", has_text="support").click()
    assert supports() == sorted(supports())


def test_categorisation_report_renders_without_a_neighbours_run(runs):
    html = open(runs["report"], encoding="utf-8").read()
    assert 'id="evaluation"' in html and 'id="statistics"' in html and 'id="model-card"' in html
    assert 'id="neighbours"' not in html and "prodcat_visual_neighbours" in html
    assert "data:image/png;base64," in html and "<script src" not in html  # self-contained


def test_neighbours_report_links_the_categorisation_report(runs):
    html = open(runs["neighbours_report"], encoding="utf-8").read()
    assert 'href="../../../prodcat_categorise/r1/report/index.html"' in html


def test_same_category_share_counts_neighbours_in_the_true_category(runs):
    from pipelines.report.gallery import neighbours_section

    section = neighbours_section(
        storage.join(runs["neighbours_run"], "neighbours"), storage.join(runs["run"], "preprocess"), runs["tree"], "true_category", 2
    )
    with_image = [d for d in runs["docs"] if d["image_url"]]
    # the fixture puts every product of the same level-2 category first, so within-group share is exact
    expected = []
    for d in with_image:
        group = " > ".join(d["true_category"].split(" > ")[:2])
        same_group = sum(" > ".join(o["true_category"].split(" > ")[:2]) == group for o in with_image) - 1
        expected.append(min(same_group, NEIGHBOURS_K) / NEIGHBOURS_K)
    assert section["same_group_share"] == pytest.approx(np.mean(expected))
    assert 0 < section["same_category_share"] <= section["same_group_share"]
    assert section["share_by_rank"][0] >= section["share_by_rank"][-1]


def test_rules_scored_against_ground_truth_and_a_perfect_model_scores_one(runs):
    tree = runs["tree"]
    test = evaluation.load_test_scores(storage.join(runs["run"], "evaluation"), tree)
    perfect = dataclasses.replace(test, scores=test.ground_truth.astype(np.float32), thresholds=np.full(len(tree), 0.5, np.float32))
    assert all(r["f1"] == 1.0 and r["precision"] == 1.0 for r in evaluation.category_rows(perfect))
    assert evaluation.top_confusions(perfect) == []
    calibration = evaluation.reliability(perfect)
    assert calibration["ece"] == pytest.approx(0.0) and sum(b["count"] for b in calibration["bins"]) == calibration["cells"]
    rules_row = evaluation.level_rows({}, test)[1]
    assert (rules_row["system"], rules_row["against"]) == ("rules", "ground truth")
    assert rules_row["levels"]["1"]["micro_precision"] > 0.8


def test_top_confusions_name_the_category_shown_instead():
    tree = CategoryTree.from_paths([("A", "x", "1"), ("A", "y", "2")])
    truth = truth_matrix(tree, [["A > x > 1"], ["A > x > 1"], ["A > y > 2"]])
    scores = truth_matrix(tree, [["A > y > 2"], ["A > x > 1"], ["A > y > 2"]]).astype(np.float32)
    test = evaluation.TestScores(tree, scores, np.full(len(tree), 0.5, np.float32), truth, truth)
    confusions = evaluation.top_confusions(test)
    assert [(c["level"], c["true_id"], c["predicted_id"], c["count"], c["share"]) for c in confusions] == [
        (2, "A > x", "A > y", 1, 0.5),
        (3, "A > x > 1", "A > y > 2", 1, 0.5),
    ]


@pytest.mark.parametrize(
    "decision, expected",
    [
        ({"blessed": True, "forced": True}, "forced by the run's force_publish param"),
        ({"blessed": True, "forced": False, "previous": None}, "no model was blessed before"),
        ({"blessed": True, "forced": False, "previous": {"model_dir": "/m/new", "value": 0.5}}, "already the blessed one"),
        (
            {"blessed": True, "forced": False, "previous": {"model_dir": "/m/old", "value": 0.7, "model_version": "v0"}},
            "0.800 is at least the blessed model's 0.700 (v0)",
        ),
        (
            {"blessed": False, "forced": False, "previous": {"model_dir": "/m/old", "value": 0.9, "model_version": "v0"}},
            "0.800 is below the blessed model's 0.900; predictions came from v0",
        ),
    ],
)
def test_blessing_reason(decision, expected):
    assert expected in build.blessing_reason({"metric": "ground_truth.hierarchical_f1", "value": 0.8, "model_dir": "/m/new", **decision})


def test_report_tolerates_missing_stages_and_unreachable_photos(runs, tmp_path):
    """An evaluation without saved scores, no statistics stage and photos that cannot be fetched."""
    import shutil

    run = tmp_path / "runs" / "prodcat_categorise" / "old"
    shutil.copytree(runs["run"], run)
    (run / "evaluation" / SCORES_FILE).unlink()
    shutil.rmtree(run / "statistics")
    html = open(build.write_report(runs["cfg"], str(run), str(run / "report")), encoding="utf-8").read()
    assert 'id="levels-table"' in html and "kept no per-product scores" in html and 'id="statistics"' not in html
    assert storage.is_complete(str(run / "report"))
    assert build.gallery.thumbnail("http://127.0.0.1:9/none.jpg", timeout_s=0.5) is None


def test_cli_prints_the_report_and_renders_a_missing_one(runs, tmp_path):
    import shutil

    run = tmp_path / "runs" / "prodcat_categorise" / "copy"
    shutil.copytree(runs["run"], run, ignore=shutil.ignore_patterns("report"))
    out = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "report", str(run)], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == str(run / "report" / "index.html")
    assert 'id="evaluation"' in (run / "report" / "index.html").read_text(encoding="utf-8")


def test_the_report_imports_neither_the_image_encoder_nor_tensorflow():
    heavy = ("apache_beam.ml.inference.base", "torch", "tensorflow")
    code = f"import sys, pipelines.report.build; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "[]"
