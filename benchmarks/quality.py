"""Quality benchmark on one preprocessed catalogue, one split: ground-truth micro-F1 and
precision@1 per tree level of the rule labels alone, a scikit-learn TF-IDF + one-vs-rest
logistic regression trained on the same rule labels, and each of prodcat's models.

    python -m benchmarks.quality --preprocess-dir .prodcat/bench/data/runs/prodcat_categorise/bench/preprocess
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from pipelines import storage
from benchmarks.results_file import write_results
from pipelines.config import load_config
from pipelines.preprocess import read_clean_rows
from pipelines.taxonomy import CategoryTree
from trainer.metrics import evaluate_predictions, truth_matrix

REPO = Path(__file__).resolve().parents[1]
NAME = "quality"
MODELS = ("linear", "ffn", "wide_deep")


def level_summary(metrics: dict) -> Dict[str, dict]:
    return {lvl: {"micro_f1": round(v["micro_f1"], 4), "precision_at_1": round(v["precision_at_1"], 4),
                  "micro_precision": round(v["micro_precision"], 4), "micro_recall": round(v["micro_recall"], 4)}
            for lvl, v in metrics["levels"].items()}


def text_of(row: dict) -> str:
    return re.sub(r"[^0-9a-z]+", " ", (row["title"] or "").lower()) + f" gender_{(row.get('gender') or '').lower()}"


def sklearn_baseline(train_rows: List[dict], test_rows: List[dict], tree: CategoryTree):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    labelled = [r for r in train_rows if r["rule_categories"]]
    y = truth_matrix(tree, [r["rule_categories"] for r in labelled])
    used = np.flatnonzero(y.any(axis=0) & ~y.all(axis=0))
    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    x = vectorizer.fit_transform([text_of(r) for r in labelled])
    started = time.perf_counter()
    clf = OneVsRestClassifier(LogisticRegression(C=4.0, max_iter=1000), n_jobs=2).fit(x, y[:, used])
    fit_seconds = time.perf_counter() - started
    scores = np.zeros((len(test_rows), len(tree)), dtype=np.float32)
    scores[:, used] = clf.predict_proba(vectorizer.transform([text_of(r) for r in test_rows]))
    always = np.flatnonzero(y.all(axis=0))
    scores[:, always] = 1.0
    return scores, scores >= 0.5, {"train_examples": len(labelled), "fit_seconds": round(fit_seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preprocess-dir", required=True)
    parser.add_argument("--work-dir", default=str(REPO / ".prodcat" / "bench" / "quality"))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()

    from trainer.evaluate import evaluate_model
    from trainer.train import train

    cfg = load_config(REPO / "feature_config.yaml")
    tree = CategoryTree.from_records(storage.read_json(storage.join(args.preprocess_dir, "categories.json")))
    rows = list(read_clean_rows(args.preprocess_dir, columns=["id", "title", "gender", "split", "rule_categories", "true_category"]))
    test = [r for r in rows if r["split"] == "test"]
    train_rows = [r for r in rows if r["split"] == "train"]
    truth = truth_matrix(tree, [[r["true_category"]] for r in test])
    levels: Dict[str, Dict[str, dict]] = {}

    def add(system: str, metrics: dict) -> None:
        for lvl, values in level_summary(metrics).items():
            levels.setdefault(lvl, {})[system] = values

    rules = truth_matrix(tree, [r["rule_categories"] or [] for r in test])
    rules_metrics = evaluate_predictions(rules.astype(np.float32), rules, truth, tree)
    add("rules", rules_metrics)
    scores, positive, sk_info = sklearn_baseline(train_rows, test, tree)
    add("sklearn_baseline", evaluate_predictions(scores, positive, truth, tree))

    models = {}
    for model_type in args.models:
        model_dir = os.path.join(args.work_dir, model_type)
        card = train(cfg.replace_model(type=model_type), args.preprocess_dir, model_dir, f"bench-{model_type}", "bench")
        metrics = evaluate_model(cfg.replace_model(type=model_type), model_dir, args.preprocess_dir)
        add(model_type, metrics["ground_truth"])
        models[model_type] = {"ground_truth": metrics["ground_truth"], "train_examples_per_s": card["train_examples_per_s"],
                              "epochs": len(card["history"]["loss"])}
        print(model_type, json.dumps(level_summary(metrics["ground_truth"])), flush=True)
    best = max(models, key=lambda m: models[m]["ground_truth"]["hierarchical_f1"])
    gt = models[best]["ground_truth"]
    result = {
        "levels": levels,
        "best_model": best,
        "best_model_vs_rules": {
            "model_hierarchical_precision": round(gt["hierarchical_precision"], 4),
            "model_hierarchical_recall": round(gt["hierarchical_recall"], 4),
            "rules_hierarchical_precision": round(rules_metrics["hierarchical_precision"], 4),
            "rules_hierarchical_recall": round(rules_metrics["hierarchical_recall"], 4),
        },
        "beats_rules_and_sklearn_every_level": all(
            levels[lvl][best]["micro_f1"] > max(levels[lvl]["rules"]["micro_f1"], levels[lvl]["sklearn_baseline"]["micro_f1"])
            for lvl in levels
        ),
        "train_examples_per_s": round(models[best]["train_examples_per_s"], 1),
        "train_examples_per_s_by_model": {m: round(v["train_examples_per_s"], 1) for m, v in models.items()},
        "sklearn": sk_info,
        "split": {s: sum(r["split"] == s for r in rows) for s in ("train", "eval", "test")},
        "labelled_train_examples": sum(bool(r["rule_categories"]) for r in train_rows),
    }
    write_results(NAME, result)
    print(json.dumps({k: v for k, v in result.items() if k != "levels"}, indent=1))


if __name__ == "__main__":
    main()
