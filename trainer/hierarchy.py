"""Decisions over the category tree: thresholds, then ancestor closure.

A positive at a lower level makes every ancestor positive (with at least its score), and
a negative lower down never removes a positive above it. Where the model keeps rule labels
(``model.keep_rule_labels``), the rules' categories of a product are positives too.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from core.taxonomy import CategoryTree


def decide(
    scores: np.ndarray, thresholds: np.ndarray, tree: CategoryTree, rule_labels: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """``(positive [N, C] bool, scores [N, C])`` after closing positives under ancestors.

    ``rule_labels`` (``[N, C]`` bool), where given, are kept: a category the rules gave a
    product is positive with score 1, and the model adds what the rules missed.
    """
    if rule_labels is not None:
        scores = np.where(rule_labels, np.float32(1.0), scores)
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
    return best_paths(scores[None, :], tree)[0]


def best_paths(scores: np.ndarray, tree: CategoryTree) -> List[List[int]]:
    """:func:`best_path` of each row of ``scores`` ``[N, C]``, a level at a time for the whole batch
    (ties go to the first child, as children are in column order)."""
    parent = np.array([tree.index[tree.nodes[cid].parent] if tree.nodes[cid].parent is not None else -1 for cid in tree.ids])
    choice = np.full(len(scores), -1)
    alive = np.ones(len(scores), dtype=bool)
    steps = []
    for _ in range(tree.levels):
        candidates = parent[None, :] == choice[:, None]  # [N, C]: the children of each row's last choice
        alive &= candidates.any(axis=1)
        choice = np.where(alive, np.argmax(np.where(candidates, scores, -np.inf), axis=1), -1)
        steps.append(choice)
    return [[int(j) for j in path if j >= 0] for path in np.stack(steps, axis=1)] if steps else [[] for _ in scores]


def category_entries(scores: np.ndarray, positive: np.ndarray, tree: CategoryTree, path: Optional[List[int]] = None) -> List[Dict]:
    """One product's predicted categories with ancestors and scores.

    Where nothing passes its threshold, the most likely path is given with ``confident: false``
    so that every product carries a category path: ``path``, where the caller has it from
    :func:`best_paths` of the same scores, else :func:`best_path`.
    """
    chosen = np.flatnonzero(positive)
    confident = len(chosen) > 0
    if not confident:
        chosen = np.array(best_path(scores, tree) if path is None else path)
    out = []
    for i in chosen:
        node = tree.nodes[tree.ids[i]]
        out.append({"id": node.id, "name": node.name, "level": node.level, "score": round(float(scores[i]), 5), "confident": confident})
    return sorted(out, key=lambda e: (e["level"], -e["score"]))
