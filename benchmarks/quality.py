"""Quality benchmark on one preprocessed catalogue, one split: ground-truth micro-F1 and
precision@1 per tree level of the rule labels alone, a scikit-learn TF-IDF + one-vs-rest
logistic regression trained on the same rule labels, and each of prodcat's models: the
configured model type over three training seeds (median, min, max), the others with one.

    python -m benchmarks.quality --preprocess-dir .prodcat/bench/data/runs/prodcat_categorise/bench/preprocess

Every figure it writes is measured in that call: nothing is read back from earlier runs.
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

from benchmarks.results_file import write_results
from core import storage
from core.config import load_config
from core.rows import RULE_CATEGORIES, read_clean_rows
from core.taxonomy import CategoryTree
from services.catalogue import RuleLabeller
from trainer.metrics import evaluate_predictions, truth_matrix

REPO = Path(__file__).resolve().parents[1]
NAME = "quality"
MODELS = ("linear", "ffn", "wide_deep")
SEEDS = (42, 43, 44)


def level_summary(metrics: dict) -> Dict[str, dict]:
    return {
        lvl: {
            "micro_f1": round(v["micro_f1"], 4),
            "precision_at_1": round(v["precision_at_1"], 4),
            "micro_precision": round(v["micro_precision"], 4),
            "micro_recall": round(v["micro_recall"], 4),
        }
        for lvl, v in metrics["levels"].items()
    }


def text_of(row: dict) -> str:
    return re.sub(r"[^0-9a-z]+", " ", (row["title"] or "").lower()) + f" gender_{(row.get('gender') or '').lower()}"


def sklearn_baseline(train_rows: List[dict], test_rows: List[dict], tree: CategoryTree):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    labelled = [r for r in train_rows if r[RULE_CATEGORIES]]
    y = truth_matrix(tree, [r[RULE_CATEGORIES] for r in labelled])
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


def rule_reach(tree: CategoryTree, rules_path: Path, true_ids: List[str], level: int) -> float:
    """Share of products whose true category at ``level`` some rule can emit."""
    labeller = RuleLabeller.from_yaml(str(rules_path), tree)
    emitted = {r.category for r in labeller.rules if tree.level_of(r.category) == level}
    at_level = [tree.closure([t]) for t in true_ids if t in tree]
    return sum(any(c in emitted for c in path) for path in at_level) / max(len(at_level), 1)


def run_model(cfg, model_type: str, seed: int, preprocess_dir: str, work_dir: str) -> dict:
    """Trains and evaluates one model type with one seed."""
    from trainer.evaluate import evaluate_model
    from trainer.train import train

    model_dir = os.path.join(work_dir, f"{model_type}-seed{seed}")
    run_cfg = cfg.replace_model(type=model_type, seed=seed)
    started = time.perf_counter()
    card = train(run_cfg, preprocess_dir, model_dir, f"bench-{model_type}-{seed}", "bench")
    train_seconds = time.perf_counter() - started
    metrics = evaluate_model(run_cfg, model_dir, preprocess_dir)
    result = {
        "model": model_type,
        "seed": seed,
        "ground_truth": metrics["ground_truth"],
        "train_seconds": round(train_seconds, 1),
        "train_examples_per_s": card["train_examples_per_s"],
        "epochs": len(card["history"]["loss"]),
        "self_training": card["self_training"],
        "thresholds_from": card["thresholds_from"],
    }
    return result


def spread(values: List[float]) -> Dict[str, float]:
    return {"median": round(float(np.median(values)), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preprocess-dir", required=True)
    parser.add_argument("--work-dir", default=str(REPO / ".prodcat" / "bench" / "quality"))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=list(SEEDS),
        help="training seeds of the configured model type; the other types run with the first",
    )
    parser.add_argument("--rules", default=str(REPO / "data" / "labelling_rules.yaml"))
    args = parser.parse_args()

    cfg = load_config(REPO / "feature_config.yaml")
    truth_field = cfg.labels.ground_truth_field
    tree = CategoryTree.from_records(storage.read_json(storage.join(args.preprocess_dir, "categories.json")))
    rows = list(read_clean_rows(args.preprocess_dir, columns=["id", "title", "gender", "split", RULE_CATEGORIES, truth_field]))
    test = [r for r in rows if r["split"] == "test"]
    train_rows = [r for r in rows if r["split"] == "train"]
    truth = truth_matrix(tree, [[r[truth_field]] for r in test])
    levels: Dict[str, Dict[str, dict]] = {}

    def add(system: str, metrics: dict) -> None:
        for lvl, values in level_summary(metrics).items():
            levels.setdefault(lvl, {})[system] = values

    rules = truth_matrix(tree, [r[RULE_CATEGORIES] or [] for r in test])
    rules_metrics = evaluate_predictions(rules.astype(np.float32), rules, truth, tree)
    add("rules", rules_metrics)
    scores, positive, sk_info = sklearn_baseline(train_rows, test, tree)
    add("sklearn_baseline", evaluate_predictions(scores, positive, truth, tree))

    runs: Dict[str, List[dict]] = {}
    for model_type in args.models:
        for seed in args.seeds if model_type == cfg.model.type else args.seeds[:1]:
            run = run_model(cfg, model_type, seed, args.preprocess_dir, args.work_dir)
            runs.setdefault(model_type, []).append(run)
            print(model_type, seed, json.dumps(level_summary(run["ground_truth"])), flush=True)
    # A model's row: the run with the median hierarchical F1 over its seeds.
    median_run = {m: sorted(r, key=lambda x: x["ground_truth"]["hierarchical_f1"])[(len(r) - 1) // 2] for m, r in runs.items()}
    for model_type, run in median_run.items():
        add(model_type, run["ground_truth"])
    best = max(median_run, key=lambda m: median_run[m]["ground_truth"]["hierarchical_f1"])
    gt = median_run[best]["ground_truth"]

    def over_seeds_of(model_runs: List[dict]) -> Dict[str, Dict[str, float]]:
        out = {lvl: spread([r["ground_truth"]["levels"][lvl]["micro_f1"] for r in model_runs]) for lvl in levels}
        out["hierarchical_f1"] = spread([r["ground_truth"]["hierarchical_f1"] for r in model_runs])
        return out

    over_seeds = over_seeds_of(runs[best])
    finest = str(tree.levels)
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
        "best_model_micro_f1_over_seeds": over_seeds,
        "configured_model_micro_f1_over_seeds": over_seeds_of(runs[cfg.model.type]) if cfg.model.type in runs else None,
        "best_model_margin_over_rules_level_3": round(over_seeds[finest]["median"] - levels[finest]["rules"]["micro_f1"], 4),
        "seeds": [
            {
                "model": r["model"],
                "seed": r["seed"],
                "hierarchical_f1": round(r["ground_truth"]["hierarchical_f1"], 4),
                "micro_f1": {lvl: round(v["micro_f1"], 4) for lvl, v in r["ground_truth"]["levels"].items()},
                "train_seconds": r["train_seconds"],
                "epochs": r["epochs"],
                "self_training": r["self_training"],
            }
            for rs in runs.values()
            for r in rs
        ],
        "seeds_per_model": {m: [r["seed"] for r in rs] for m, rs in runs.items()},
        "model_rows_are": "each model type's run with the median hierarchical F1 over its seeds",
        "thresholds_from": median_run[best]["thresholds_from"],
        "rule_reach_level_3": round(rule_reach(tree, Path(args.rules), [r[truth_field] for r in test], 3), 4),
        "configured_model": cfg.model.type,
        "train_examples_per_s": round(median_run[cfg.model.type]["train_examples_per_s"], 1) if cfg.model.type in median_run else None,
        "train_examples_per_s_by_model": {m: round(v["train_examples_per_s"], 1) for m, v in median_run.items()},
        "sklearn": sk_info,
        "split": {s: sum(r["split"] == s for r in rows) for s in ("train", "eval", "test")},
        "labelled_train_examples": sum(bool(r[RULE_CATEGORIES]) for r in train_rows),
    }
    write_results(NAME, result)
    print(json.dumps({k: v for k, v in result.items() if k != "levels"}, indent=1))


if __name__ == "__main__":
    main()
