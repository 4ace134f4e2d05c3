"""Decisions over the category tree: thresholds, then ancestor closure.

A positive at a lower level makes every ancestor positive (with at least its score), and
a negative lower down never removes a positive above it.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from pipelines.taxonomy import CategoryTree


def decide(scores: np.ndarray, thresholds: np.ndarray, tree: CategoryTree) -> Tuple[np.ndarray, np.ndarray]:
    """``(positive [N, C] bool, scores [N, C])`` after closing positives under ancestors."""
    positive = scores >= thresholds[None, :]
    closed = scores.copy()
    for cid in sorted(tree.ids, key=tree.level_of, reverse=True):
        parent = tree.nodes[cid].parent
        if parent is None:
            continue
        c, p = tree.index[cid], tree.index[parent]
        closed[:, p] = np.where(positive[:, c], np.maximum(closed[:, p], closed[:, c]), closed[:, p])
        positive[:, p] |= positive[:, c]
    return positive, closed


def best_path(scores: np.ndarray, tree: CategoryTree) -> List[int]:
    """The greedy top-down path of highest-scoring children, as label indices."""
    path: List[int] = []
    candidates = [cid for cid in tree.ids if tree.nodes[cid].parent is None]
    while candidates:
        best = max(candidates, key=lambda cid: scores[tree.index[cid]])
        path.append(tree.index[best])
        candidates = tree.children(best)
    return path


def category_entries(scores: np.ndarray, positive: np.ndarray, tree: CategoryTree) -> List[Dict]:
    """One product's predicted categories with ancestors and scores.

    Where nothing passes its threshold, the most likely path is given with ``confident: false``
    so that every product carries a category path.
    """
    chosen = np.flatnonzero(positive)
    confident = len(chosen) > 0
    if not confident:
        chosen = np.array(best_path(scores, tree))
    out = []
    for i in chosen:
        node = tree.nodes[tree.ids[i]]
        out.append({"id": node.id, "name": node.name, "level": node.level, "score": round(float(scores[i]), 5), "confident": confident})
    return sorted(out, key=lambda e: (e["level"], -e["score"]))
