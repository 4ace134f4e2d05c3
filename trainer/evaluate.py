"""Evaluation of an exported model on the test split, against rule labels and ground truth,
and the blessing gate that decides whether it replaces the current model."""

from __future__ import annotations

import io
import logging
from typing import Any, Dict, List, Optional

import numpy as np

from core import storage
from core.config import FeatureConfig
from core.rows import RULE_CATEGORIES, read_clean_rows
from core.taxonomy import CategoryTree
from trainer.hierarchy import decide
from trainer.metrics import evaluate_predictions, truth_matrix
from trainer.predict import score_batches
from trainer.serving import ServingModel

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.npz"
BLESSED_FILE = "blessed.json"


def write_scores(
    path: str,
    ids: List[str],
    raw_scores: np.ndarray,
    thresholds: np.ndarray,
    tree: CategoryTree,
    rule_truth: np.ndarray,
    true_truth: np.ndarray,
) -> None:
    """The split's raw category scores and both label sets (``.npz``), for the run report's
    per-category tables, precision-recall curves and reliability plot."""
    with storage.open_write(path) as f:
        np.savez_compressed(
            f,
            ids=np.asarray(ids),
            categories=np.asarray(tree.ids),
            scores=raw_scores.astype(np.float32),
            thresholds=np.asarray(thresholds, dtype=np.float32),
            rule_labels=rule_truth,
            ground_truth=true_truth,
        )


def read_scores(path: str) -> Dict[str, np.ndarray]:
    with storage.open_read(path) as f:
        with np.load(io.BytesIO(f.read())) as data:
            return {k: data[k] for k in data.files}


def evaluate_model(
    cfg: FeatureConfig, model_dir: str, preprocess_dir: str, split: str = "test", scores_path: Optional[str] = None
) -> Dict[str, Any]:
    """Metrics of the served model on ``split``: ``{"rule_labels": .., "ground_truth": .., "attributes": ..}``;
    with ``scores_path``, also the split's scores and labels (:func:`write_scores`)."""
    model = ServingModel.load(model_dir)
    tree = model.tree
    rows = read_clean_rows(preprocess_dir, split=split)
    ids, raw, scores, positives, rule_sets, true_sets = [], [], [], [], [], []
    attr_hits = {a.name: [0, 0] for a in cfg.labels.attributes}
    vocab = model.attribute_values()
    for batch, outputs in score_batches(cfg, model, rows):
        positive, closed = decide(outputs["category_scores"], model.thresholds, tree, model.rule_labels(batch))
        ids.extend(r["id"] for r in batch)
        raw.append(outputs["category_scores"])
        scores.append(closed)
        positives.append(positive)
        rule_sets.extend(r[RULE_CATEGORIES] or [] for r in batch)
        true_sets.extend([r[cfg.labels.ground_truth_field]] if r.get(cfg.labels.ground_truth_field) else [] for r in batch)
        for attr in cfg.labels.attributes:
            if not vocab.get(attr.name):
                continue
            predicted = np.argmax(outputs[f"{attr.name}_probs"], axis=1)
            for r, p in zip(batch, predicted):
                if r.get(attr.source):
                    attr_hits[attr.name][0] += int(vocab[attr.name][p] == r[attr.source].lower())
                    attr_hits[attr.name][1] += 1
    if not scores:
        return {"split": split, "examples": 0}
    s, p = np.concatenate(scores), np.concatenate(positives)
    rule_truth, true_truth = truth_matrix(tree, rule_sets), truth_matrix(tree, true_sets)
    if scores_path is not None:
        write_scores(scores_path, ids, np.concatenate(raw), model.thresholds, tree, rule_truth, true_truth)
    return {
        "split": split,
        "examples": int(len(s)),
        "model_version": model.card["model_version"],
        "rule_labels": evaluate_predictions(s, p, rule_truth, tree),
        "ground_truth": evaluate_predictions(s, p, true_truth, tree),
        "attributes": {k: {"accuracy": h / n if n else None, "examples": n} for k, (h, n) in attr_hits.items()},
    }


def metric_value(metrics: Dict[str, Any], dotted: str) -> float:
    value: Any = metrics
    for key in dotted.split("."):
        value = value[key]
    return float(value)


def bless(metrics: Dict[str, Any], metric: str, blessed_path: str, model_dir: str, force: bool) -> Dict[str, Any]:
    """Publishes the model as the blessed one if it is at least as good on ``metric`` (or ``force``)."""
    current: Optional[Dict[str, Any]] = storage.read_json(blessed_path) if storage.exists(blessed_path) else None
    new_value = metric_value(metrics, metric)
    blessed = force or current is None or current["model_dir"] == model_dir or new_value >= current["value"]
    decision = {
        "blessed": blessed,
        "forced": force,
        "metric": metric,
        "value": new_value,
        "previous": current,
        "model_dir": model_dir,
        "model_version": metrics.get("model_version"),
    }
    if blessed:
        storage.write_json(blessed_path, {k: decision[k] for k in ("metric", "value", "model_dir", "model_version")})
    log.info("blessing: %s", decision)
    return decision
