"""Multi-label metrics over a category tree: precision/recall@k, per-level F1, hierarchical F1."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from core.taxonomy import CategoryTree


def truth_matrix(tree: CategoryTree, label_sets: Sequence[Sequence[str]]) -> np.ndarray:
    """Multi-hot ``[N, C]`` of each set closed under ancestors; unknown ids are ignored."""
    y = np.zeros((len(label_sets), len(tree)), dtype=bool)
    for i, labels in enumerate(label_sets):
        for cid in tree.closure([c for c in labels if c in tree]):
            y[i, tree.index[cid]] = True
    return y


def _f1(tp: float, fp: float, fn: float) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def evaluate_predictions(
    scores: np.ndarray, positive: np.ndarray, truth: np.ndarray, tree: CategoryTree, ks: Sequence[int] = (1, 3, 5)
) -> Dict[str, object]:
    """Metrics of ``positive`` decisions and ``scores`` ranking against ``truth`` (all ``[N, C]``).

    Rows without any true label are left out (nothing is known about them).
    """
    keep = truth.any(axis=1)
    scores, positive, truth = scores[keep], positive[keep], truth[keep]
    out: Dict[str, object] = {"examples": int(keep.sum())}
    if not keep.any():
        return out
    order = np.argsort(-scores, axis=1, kind="stable")
    for k in ks:
        hits = np.take_along_axis(truth, order[:, :k], axis=1).sum(axis=1)
        out[f"precision_at_{k}"] = float(np.mean(hits / k))
        out[f"recall_at_{k}"] = float(np.mean(hits / truth.sum(axis=1)))
    levels = {}
    for level in range(1, tree.levels + 1):
        cols = np.array([tree.index[c] for c in tree.ids if tree.level_of(c) == level])
        t, p, s = truth[:, cols], positive[:, cols], scores[:, cols]
        tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)
        present = t.sum(0) > 0
        has_level = t.any(axis=1)
        top1 = np.argmax(s, axis=1)
        levels[str(level)] = {
            "micro_f1": _f1(tp.sum(), fp.sum(), fn.sum()),
            "micro_precision": float(tp.sum() / max(tp.sum() + fp.sum(), 1)),
            "micro_recall": float(tp.sum() / max(tp.sum() + fn.sum(), 1)),
            "macro_f1": float(np.mean([_f1(a, b, c) for a, b, c in zip(tp[present], fp[present], fn[present])])) if present.any() else 0.0,
            "precision_at_1": float(t[np.arange(len(t)), top1][has_level].mean()) if has_level.any() else 0.0,
            "examples": int(has_level.sum()),
        }
    out["levels"] = levels
    inter = (truth & positive).sum()
    h_p = inter / max(positive.sum(), 1)
    h_r = inter / max(truth.sum(), 1)
    out["hierarchical_precision"] = float(h_p)
    out["hierarchical_recall"] = float(h_r)
    out["hierarchical_f1"] = float(0.0 if inter == 0 else 2 * h_p * h_r / (h_p + h_r))
    return out
