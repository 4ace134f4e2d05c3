"""The review queue (active learning): the products a run is least sure of, for human labelling.

Per category, the products whose model score lies nearest the category's threshold
(``uncertain``), and per human-labelled category with few examples, the unlabelled products
nearest its prototype (``few_examples``), each with the model's top guesses. Selection streams
batch by batch in bounded memory; the run's records (at most ``review.max_per_run``, nearest
first) land in the predict stage's folder; ``pipelines.review`` indexes them.
"""

from __future__ import annotations

import heapq
import logging
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from core.config import Review
from core.taxonomy import CategoryTree

log = logging.getLogger(__name__)

REVIEW_FILE = "review.jsonl.gz"
UNCERTAIN = "uncertain"
FEW_EXAMPLES = "few_examples"


def top_guesses(scores: np.ndarray, tree: CategoryTree, count: int, level: int) -> List[dict]:
    """The ``count`` best-scoring categories of ``level`` of one product's scores."""
    cols = np.asarray(tree.level_columns(level))
    best = cols[np.argsort(-scores[cols], kind="stable")[:count]]
    return [{"id": tree.ids[j], "score": round(float(scores[j]), 5), "classifier": "model"} for j in best]


class ReviewCollector:
    """Keeps, per (reason, category), the ``per_category`` candidates of smallest distance: ``(distance,
    product id, record, the product's scores)``; a record's top guesses are computed from its scores
    only for the records a run keeps (for every candidate offered, they took 1.6 of the predict stage's
    14 s on the full catalogue)."""

    def __init__(self, review: Review, tree: CategoryTree, run_id: str, model_version: str):
        self._review = review
        self._tree = tree
        self._run_id = run_id
        self._model_version = model_version
        self._best: Dict[Tuple[str, str], List[Tuple[float, str, dict, np.ndarray]]] = {}

    def _offer(
        self, reason: str, category: str, distances: np.ndarray, rows: Sequence[Mapping], make: Callable[[int], Tuple[dict, np.ndarray]]
    ) -> None:
        if self._review.per_category == 0:
            return
        finite = np.flatnonzero(np.isfinite(distances))
        if not len(finite):
            return
        take = finite[np.argsort(distances[finite], kind="stable")[: self._review.per_category]]
        current = self._best.setdefault((reason, category), [])
        merged = current + [(float(distances[i]), rows[i]["id"], *make(int(i))) for i in take]
        self._best[(reason, category)] = heapq.nsmallest(self._review.per_category, merged, key=lambda c: (c[0], c[1]))

    def add_batch(
        self,
        rows: Sequence[Mapping],
        raw_scores: np.ndarray,
        thresholds: np.ndarray,
        kept: np.ndarray,
        decided_by: Sequence[str],
        prototype_similarities: Mapping[str, np.ndarray],
        title_field: str,
    ) -> None:
        """One batch: ``raw_scores`` and ``kept`` labels are ``[B, C]``; ``prototype_similarities``
        maps each human-labelled category with few examples to the batch's cosines to it."""

        def make(reason: str, category: str, score: np.ndarray, threshold: float) -> Callable[[int], Tuple[dict, np.ndarray]]:
            def record(i: int) -> Tuple[dict, np.ndarray]:
                return {
                    "run_id": self._run_id,
                    "product_id": rows[i]["id"],
                    "title": rows[i].get(title_field) or "",
                    "reason": reason,
                    "category": category,
                    "score": round(float(score[i]), 5),
                    "threshold": round(float(threshold), 5),
                    "decided_by": decided_by[i],
                    "model_version": self._model_version,
                }, raw_scores[i].copy()

            return record

        for j, cid in enumerate(self._tree.ids):
            distance = np.where(kept[:, j], np.inf, np.abs(raw_scores[:, j] - thresholds[j]))
            self._offer(UNCERTAIN, cid, distance, rows, make(UNCERTAIN, cid, raw_scores[:, j], thresholds[j]))
        for cid, sims in prototype_similarities.items():
            distance = np.where(kept[:, self._tree.index[cid]], np.inf, 1.0 - sims)
            self._offer(FEW_EXAMPLES, cid, distance, rows, make(FEW_EXAMPLES, cid, sims, np.nan))

    def records(self) -> List[dict]:
        """At most ``max_per_run`` records, nearest first, one per product: its nearest reason,
        with every reason it was chosen for in ``reasons``."""
        candidates = sorted((c for best in self._best.values() for c in best), key=lambda c: (c[0], c[1]))
        by_product: Dict[str, dict] = {}
        for distance, pid, record, scores in candidates:
            reason = {"reason": record["reason"], "category": record["category"], "distance": round(distance, 5)}
            if pid in by_product:
                by_product[pid]["reasons"].append(reason)
                continue
            if len(by_product) >= self._review.max_per_run:
                continue
            record["distance"] = round(distance, 5)
            if not np.isfinite(record["threshold"]):
                record["threshold"] = None
            record["reasons"] = [reason]
            record["guesses"] = top_guesses(scores, self._tree, self._review.top_guesses, self._tree.levels)
            by_product[pid] = record
        return list(by_product.values())
