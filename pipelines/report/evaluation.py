"""The report's evaluation figures from the evaluation stage: per-level P/R/F1 of the model and
of the rules, per-category scores, precision-recall curves, top confusions and calibration.

Everything is computed from ``evaluation/metrics.json`` and ``evaluation/scores.npz`` (the test
split's raw scores, thresholds and both label sets); the model is never run again here."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Dict, List, Optional

import numpy as np

from core import storage
from core.taxonomy import CategoryTree
from trainer.evaluate import METRICS_FILE, SCORES_FILE, read_scores
from trainer.hierarchy import best_paths, decide
from trainer.metrics import evaluate_predictions

RELIABILITY_BINS = 10


@dataclasses.dataclass(frozen=True)
class TestScores:
    """The test split as the evaluation saw it: ``[N, C]`` raw scores and label matrices."""

    tree: CategoryTree
    scores: np.ndarray
    thresholds: np.ndarray
    rule_labels: np.ndarray
    ground_truth: np.ndarray

    @property
    def decisions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(positive, closed scores)`` exactly as prediction decides them."""
        return decide(self.scores, self.thresholds, self.tree)


def load_test_scores(evaluation_dir: str, tree: CategoryTree) -> Optional[TestScores]:
    """The saved test scores, or None for an evaluation that kept none."""
    path = storage.join(evaluation_dir, SCORES_FILE)
    if not storage.exists(path):
        return None
    data = read_scores(path)
    if tuple(data["categories"]) != tree.ids:
        raise ValueError(f"{path}: categories differ from the run's category tree")
    return TestScores(tree, data["scores"], data["thresholds"], data["rule_labels"].astype(bool), data["ground_truth"].astype(bool))


def read_metrics(evaluation_dir: str) -> Dict[str, Any]:
    return storage.read_json(storage.join(evaluation_dir, METRICS_FILE))


def level_rows(metrics: Dict[str, Any], test: Optional[TestScores]) -> List[Dict[str, Any]]:
    """One row per comparison (model vs ground truth, rules vs ground truth, model vs rule labels)
    with micro P/R/F1 per level, hierarchical F1 and precision@1."""
    compared = [("model", "ground truth", metrics.get("ground_truth", {}))]
    if test is not None:
        rules = test.rule_labels
        compared.append(("rules", "ground truth", evaluate_predictions(rules.astype(np.float32), rules, test.ground_truth, test.tree)))
    compared.append(("model", "rule labels", metrics.get("rule_labels", {})))
    rows = []
    for system, against, m in compared:
        levels = m.get("levels", {})
        rows.append(
            {
                "system": system,
                "against": against,
                "examples": m.get("examples", 0),
                "levels": {lvl: {k: levels[lvl][k] for k in ("micro_precision", "micro_recall", "micro_f1")} for lvl in sorted(levels)},
                "hierarchical_f1": m.get("hierarchical_f1"),
                "precision_at_1": m.get("precision_at_1"),
            }
        )
    return rows


def _prf(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float, float]:
    tp = float((truth & predicted).sum())
    precision = tp / max(float(predicted.sum()), 1.0)
    recall = tp / max(float(truth.sum()), 1.0)
    f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f1


def category_rows(test: TestScores) -> List[Dict[str, Any]]:
    """Per category with ground-truth support or model positives: the model's P/R/F1 and the
    rules' F1 against ground truth on the labelled test products, and the threshold."""
    positive, _ = test.decisions
    known = test.ground_truth.any(axis=1)
    truth, positive, rules = test.ground_truth[known], positive[known], test.rule_labels[known]
    rows = []
    for c, cid in enumerate(test.tree.ids):
        support, predicted = int(truth[:, c].sum()), int(positive[:, c].sum())
        if support == 0 and predicted == 0:
            continue
        precision, recall, f1 = _prf(truth[:, c], positive[:, c])
        rows.append(
            {
                "id": cid,
                "name": test.tree.nodes[cid].name,
                "level": test.tree.level_of(cid),
                "support": support,
                "predicted": predicted,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "rules_f1": _prf(truth[:, c], rules[:, c])[2],
                "threshold": float(test.thresholds[c]),
            }
        )
    return sorted(rows, key=lambda r: (-r["support"], r["id"]))


def pr_curves(test: TestScores, level: int, count: int = 6) -> List[Dict[str, Any]]:
    """Precision-recall curves against ground truth of the ``count`` best-supported categories at
    ``level``, each with the point its chosen threshold lands on."""
    known = test.ground_truth.any(axis=1)
    truth, scores = test.ground_truth[known], test.scores[known]
    at_level = [test.tree.index[c] for c in test.tree.ids if test.tree.level_of(c) == level]
    chosen = sorted((c for c in at_level if truth[:, c].sum() > 0), key=lambda c: -truth[:, c].sum())[:count]
    curves = []
    for c in chosen:
        order = np.argsort(-scores[:, c], kind="stable")
        y = truth[order, c]
        tp = np.cumsum(y)
        precision = tp / np.arange(1, len(y) + 1)
        recall = tp / y.sum()
        at_threshold = scores[:, c] >= test.thresholds[c]
        p, r, _ = _prf(truth[:, c], at_threshold)
        curves.append(
            {
                "name": test.tree.nodes[test.tree.ids[c]].name,
                "support": int(y.sum()),
                "precision": precision,
                "recall": recall,
                "threshold": float(test.thresholds[c]),
                "threshold_point": (r, p),
            }
        )
    return curves


def top_confusions(test: TestScores, count: int = 10) -> List[Dict[str, Any]]:
    """The most frequent (true, predicted) category pairs that differ, per level below the top,
    where predicted is the best path through the closed scores (what a product is shown under)."""
    _, closed = test.decisions
    tree = test.tree
    pairs: Counter = Counter()
    support: Counter = Counter()
    labelled = np.flatnonzero(test.ground_truth.any(axis=1))
    for i, best in zip(labelled, best_paths(closed[labelled], tree)):
        path = [tree.ids[j] for j in best]
        for c in np.flatnonzero(test.ground_truth[i]):
            cid = tree.ids[c]
            level = tree.level_of(cid)
            if level < 2 or level > len(path):
                continue
            support[cid] += 1
            if path[level - 1] != cid:
                pairs[(level, cid, path[level - 1])] += 1
    return [
        {
            "level": level,
            "true": tree.nodes[true].name,
            "true_id": true,
            "predicted": tree.nodes[pred].name,
            "predicted_id": pred,
            "count": n,
            "share": n / support[true],
        }
        for (level, true, pred), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:count]
    ]


def reliability(test: TestScores, bins: int = RELIABILITY_BINS) -> Dict[str, Any]:
    """Calibration of the closed scores against ground truth over every (product, category) cell
    of the labelled test products: per score bin, mean score, observed rate and count; and the
    expected calibration error."""
    _, closed = test.decisions
    known = test.ground_truth.any(axis=1)
    scores, truth = closed[known].ravel(), test.ground_truth[known].ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    rows = []
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        n = int(in_bin.sum())
        if n == 0:
            continue
        mean_score, observed = float(scores[in_bin].mean()), float(truth[in_bin].mean())
        ece += n / len(scores) * abs(mean_score - observed)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "mean_score": mean_score, "observed": observed, "count": n})
    return {"bins": rows, "ece": ece, "cells": int(len(scores))}
