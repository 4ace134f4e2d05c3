"""Few-shot classifiers: categories from a few human labels, without retraining the network.

Every product has an embedding (the exported model's ``embedding`` output, unit rows). Human-
labelled categories decide; finest-level categories of rule-labelled products are competitors
only, so that a product near a category the model already knows is not claimed by a new one.
Only a product without a finest-level human or rule label can be decided, and only for a human
category on the path of its kept labels. Two classifiers (``fewshot.classifier``):

- ``probe``: a multinomial logistic regression over the frozen embedding whose classes are the
  human categories and the competitors (balanced class weights); a product gets the human
  category that has the highest probability of all classes.
- ``prototypes``: a category's prototype is the normalised mean embedding of its examples; a
  product gets the human category whose prototype is nearest, when it is nearer than every
  competitor and its cosine reaches the category's threshold: ``fewshot.min_similarity`` where
  set, else the leave-one-out threshold (the lowest cosine of one of the category's own examples
  to the prototype of the others, less ``fewshot.threshold_margin``; categories with one example
  take the median of the others).

Prototypes are built either way: the review queue measures distances to them.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from core.taxonomy import CategoryTree

HUMAN = "human"
RULES = "rules"
PROTOTYPES = "prototypes"
PROBE = "probe"
MODEL = "model"
NONE = "none"


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclasses.dataclass(frozen=True)
class Prototypes:
    """One row per category: its normalised mean embedding, example count, threshold, and
    whether it comes from human labels (decides) or rule labels (competitor only)."""

    categories: Tuple[str, ...]
    vectors: np.ndarray  # [P, D]
    counts: np.ndarray  # [P]
    thresholds: np.ndarray  # [P], for human prototypes; inf for competitors
    human: np.ndarray  # [P] bool

    @property
    def human_categories(self) -> Tuple[str, ...]:
        return tuple(c for c, h in zip(self.categories, self.human) if h)

    def to_json(self) -> dict:
        return {
            "categories": list(self.categories),
            "counts": self.counts.tolist(),
            "thresholds": [None if not np.isfinite(t) else round(float(t), 5) for t in self.thresholds],
            "human": self.human.tolist(),
        }


def leave_one_out_similarities(embeddings: np.ndarray) -> np.ndarray:
    """Each row's cosine to the normalised mean of the other rows (NaN with one row)."""
    if len(embeddings) < 2:
        return np.full(len(embeddings), np.nan, dtype=np.float32)
    rest = embeddings.sum(axis=0, keepdims=True) - embeddings
    return np.sum(normalise(embeddings) * normalise(rest), axis=1)


def build_prototypes(
    human_examples: Mapping[str, np.ndarray],
    rule_examples: Mapping[str, np.ndarray],
    min_examples: int,
    min_similarity: Optional[float],
    threshold_margin: float,
) -> Prototypes:
    """Prototypes of the human-labelled categories with at least ``min_examples`` examples
    (category -> ``[n, D]`` embeddings) and of the rule-labelled competitor categories; a
    category with human labels is never also a competitor."""
    human = {c: normalise(e) for c, e in sorted(human_examples.items()) if len(e) >= min_examples}
    rules = {c: normalise(e) for c, e in sorted(rule_examples.items()) if len(e) and c not in human}
    loo = {c: float(np.min(leave_one_out_similarities(e))) - threshold_margin for c, e in human.items() if len(e) >= 2}
    fallback = float(np.median(list(loo.values()))) if loo else 0.0
    thresholds = [min_similarity if min_similarity is not None else loo.get(c, fallback) for c in human]
    categories = (*human, *rules)
    dim = next((e.shape[1] for e in (*human.values(), *rules.values())), 0)
    vectors = normalise(np.stack([e.mean(axis=0) for e in (*human.values(), *rules.values())])) if categories else np.zeros((0, dim))
    return Prototypes(
        categories=categories,
        vectors=vectors,
        counts=np.array([len(e) for e in (*human.values(), *rules.values())], dtype=np.int64),
        thresholds=np.array(thresholds + [np.inf] * len(rules), dtype=np.float32),
        human=np.array([True] * len(human) + [False] * len(rules), dtype=bool),
    )


@dataclasses.dataclass(frozen=True)
class Matches:
    """Per product: the nearest human prototype, its cosine and threshold, and whether it decides."""

    category: np.ndarray  # [N] index into Prototypes.categories, -1 without human prototypes
    similarity: np.ndarray  # [N]
    threshold: np.ndarray  # [N]
    decides: np.ndarray  # [N] bool


def _no_matches(n: int) -> Matches:
    empty = np.full(n, np.nan, dtype=np.float32)
    return Matches(np.full(n, -1), empty, empty, np.zeros(n, dtype=bool))


def _agreement(categories: Sequence[str], kept: np.ndarray, tree: CategoryTree) -> Tuple[np.ndarray, np.ndarray]:
    """``agrees [N, len(categories)]``: no kept label of the product lies off the category's path;
    ``open_rows [N]``: the product has no kept finest-level label."""
    paths = np.zeros((len(categories), len(tree)), dtype=bool)
    for row, category in enumerate(categories):
        paths[row, [tree.index[c] for c in tree.closure([category])]] = True
    agrees = (kept.astype(np.int64) @ (~paths).T.astype(np.int64)) == 0
    return agrees, ~kept[:, tree.level_columns(tree.levels)].any(axis=1)


def match(prototypes: Prototypes, embeddings: np.ndarray, kept: np.ndarray, tree: CategoryTree) -> Matches:
    """The nearest human prototype of each product that agrees with its kept (human or rule)
    labels ``[N, C]``, and whether it decides: the product has no kept finest-level label, the
    prototype is nearer than every competitor, and its cosine reaches its threshold."""
    n = len(embeddings)
    if not prototypes.human.any():
        return _no_matches(n)
    sims = np.asarray(embeddings, dtype=np.float32) @ prototypes.vectors.T
    human_cols = np.flatnonzero(prototypes.human)
    agrees, open_rows = _agreement([prototypes.categories[c] for c in human_cols], kept, tree)
    best = human_cols[np.argmax(np.where(agrees, sims[:, human_cols], -np.inf), axis=1)]
    best_sim = sims[np.arange(n), best]
    rival = np.max(sims[:, ~prototypes.human], axis=1) if (~prototypes.human).any() else np.full(n, -np.inf)
    threshold = prototypes.thresholds[best]
    decides = open_rows & agrees.any(axis=1) & (best_sim > rival) & (best_sim >= threshold)
    return Matches(best, best_sim, threshold, decides)


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """Multinomial logistic regression over the frozen embedding; one class per category."""

    categories: Tuple[str, ...]
    coef: np.ndarray  # [K, D]
    intercept: np.ndarray  # [K]

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        logits = np.asarray(embeddings, dtype=np.float32) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)


def fit_probe(
    prototypes: Prototypes, human_examples: Mapping[str, np.ndarray], rule_examples: Mapping[str, np.ndarray], c: float
) -> Optional[LinearProbe]:
    """A probe whose classes are the prototypes' categories (human ones and competitors), fitted
    on their examples with balanced class weights; None with fewer than two classes."""
    from sklearn.linear_model import LogisticRegression

    if len(prototypes.categories) < 2:
        return None
    examples = [human_examples[c] if h else rule_examples[c] for c, h in zip(prototypes.categories, prototypes.human)]
    x = normalise(np.concatenate(examples))
    y = np.repeat(np.arange(len(examples)), [len(e) for e in examples])
    model = LogisticRegression(C=c, max_iter=300, class_weight="balanced").fit(x, y)
    coef, intercept = model.coef_, model.intercept_
    if len(examples) == 2:  # binary: scikit-learn keeps one row, for class 1
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    return LinearProbe(prototypes.categories, coef.astype(np.float32), intercept.astype(np.float32))


def match_probe(
    probe: Optional[LinearProbe], prototypes: Prototypes, embeddings: np.ndarray, kept: np.ndarray, tree: CategoryTree
) -> Matches:
    """The probe's most probable human category of each product among those that agree with its
    kept labels, its probability (``similarity``; threshold 0), and whether it decides: the
    product has no kept finest-level label and that category is the most probable of all."""
    n = len(embeddings)
    if probe is None or not prototypes.human.any():
        return _no_matches(n)
    probs = probe.probabilities(embeddings)
    human_cols = np.flatnonzero(prototypes.human)
    agrees, open_rows = _agreement([prototypes.categories[c] for c in human_cols], kept, tree)
    best = human_cols[np.argmax(np.where(agrees, probs[:, human_cols], -np.inf), axis=1)]
    best_prob = probs[np.arange(n), best]
    decides = open_rows & agrees.any(axis=1) & (np.argmax(probs, axis=1) == best)
    return Matches(best, best_prob, np.zeros(n, dtype=np.float32), decides)


def apply_matches(
    positive: np.ndarray, scores: np.ndarray, matches: Matches, prototypes: Prototypes, tree: CategoryTree
) -> Tuple[np.ndarray, np.ndarray]:
    """Decisions where the prototype classifier decided: the matched category and its ancestors
    replace the model's positives (the kept labels, which :func:`match` made agree, are among
    them), each scored at least the cosine; elsewhere the model's decisions stand. Returns new
    ``(positive, scores)``."""
    positive, scores = positive.copy(), scores.copy()
    for i in np.flatnonzero(matches.decides):
        path = [tree.index[c] for c in tree.closure([prototypes.categories[matches.category[i]]])]
        positive[i] = False
        positive[i, path] = True
        scores[i, path] = np.maximum(scores[i, path], matches.similarity[i])
    return positive, scores


def decided_by(
    matches: Matches, finest_human: np.ndarray, finest_rule: np.ndarray, model_finest: np.ndarray, fewshot: str = PROTOTYPES
) -> List[str]:
    """Which classifier set each product's finest-level category: human labels, rules, the
    few-shot classifier (named ``fewshot``), the multi-label model, or none."""
    out = []
    for i in range(len(finest_human)):
        if finest_human[i]:
            out.append(HUMAN)
        elif finest_rule[i]:
            out.append(RULES)
        elif matches.decides[i]:
            out.append(fewshot)
        elif model_finest[i]:
            out.append(MODEL)
        else:
            out.append(NONE)
    return out


def group_examples(embeddings: np.ndarray, labels: Sequence[Optional[str]]) -> Dict[str, np.ndarray]:
    """Category -> the embeddings of its examples (rows whose label is None are skipped)."""
    rows: Dict[str, List[int]] = {}
    for i, label in enumerate(labels):
        if label is not None:
            rows.setdefault(label, []).append(i)
    return {c: np.asarray(embeddings)[idx] for c, idx in rows.items()}
