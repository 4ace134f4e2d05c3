"""The few-shot classifiers (exact small examples) and the review queue's selection."""

import numpy as np
import pytest

from core.config import Review
from core.taxonomy import CategoryTree
from pipelines.review import review_doc_id
from trainer.fewshot import (
    HUMAN,
    MODEL,
    NONE,
    PROBE,
    PROTOTYPES,
    RULES,
    apply_matches,
    build_prototypes,
    decided_by,
    fit_probe,
    leave_one_out_similarities,
    match,
    match_probe,
)
from trainer.hierarchy import decide
from trainer.metrics import truth_matrix
from trainer.review import FEW_EXAMPLES, UNCERTAIN, ReviewCollector

pytestmark = pytest.mark.unit

TREE = CategoryTree.from_paths([("A", "A1", "A1x"), ("A", "A1", "A1y"), ("A", "A2", "A2x"), ("B", "B1", "B1x")])


def unit(*v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_leave_one_out_similarity_is_each_row_against_the_mean_of_the_others():
    e = np.stack([unit(1, 0), unit(0, 1), unit(1, 1)])
    sims = leave_one_out_similarities(e)
    # row 0 against mean(row 1, row 2) = (0.354, 1.354) normalised
    rest = unit(np.sqrt(0.5), 1 + np.sqrt(0.5))
    assert sims[0] == pytest.approx(float(e[0] @ rest), rel=1e-5)
    assert np.isnan(leave_one_out_similarities(e[:1])[0])


def test_prototype_thresholds_are_the_lowest_leave_one_out_cosine_less_the_margin_and_the_median_for_one_example():
    human = {"A > A1 > A1y": np.stack([unit(1, 0, 0), unit(1, 1, 0)]), "A > A2 > A2x": np.stack([unit(0, 0, 1)])}
    rules = {"A > A1 > A1x": np.stack([unit(0, 1, 0)]), "A > A1 > A1y": np.stack([unit(0, 0, 1)])}
    p = build_prototypes(human, rules, min_examples=1, min_similarity=None, threshold_margin=0.1)
    assert p.categories == ("A > A1 > A1y", "A > A2 > A2x", "A > A1 > A1x")  # a human category is never a competitor
    assert p.human.tolist() == [True, True, False]
    assert p.thresholds[0] == pytest.approx(np.sqrt(0.5) - 0.1, rel=1e-5)  # cos(45 degrees), either way round
    assert p.thresholds[1] == pytest.approx(p.thresholds[0])  # one example: the median of the others
    assert np.isinf(p.thresholds[2])
    np.testing.assert_allclose(p.vectors[0], unit(1 + np.sqrt(0.5), np.sqrt(0.5), 0), rtol=1e-5)
    fixed = build_prototypes(human, rules, min_examples=2, min_similarity=0.5, threshold_margin=0.1)
    assert fixed.human_categories == ("A > A1 > A1y",) and fixed.thresholds[0] == 0.5


def test_the_nearest_human_prototype_decides_only_for_open_products_above_threshold_and_nearer_than_rivals():
    human = {"A > A1 > A1y": np.stack([unit(1, 0, 0)]), "B > B1 > B1x": np.stack([unit(0, 0, 1)])}
    rules = {"A > A2 > A2x": np.stack([unit(0, 1, 0)])}
    p = build_prototypes(human, rules, min_examples=1, min_similarity=0.6, threshold_margin=0.0)
    emb = np.stack(
        [
            unit(1, 0.2, 0),  # near A1y: decides
            unit(1, 0.2, 0),  # same, but its rule label is already at the finest level
            unit(0.2, 1, 0),  # nearer the rule competitor A2x
            unit(1, 0, 1.5),  # nearest B1x, but the rules said A: the agreeing A1y, below threshold (0.55)
            unit(1, 1.1, 0.1),  # nearer the competitor than A1y
        ]
    )
    kept = truth_matrix(TREE, [[], ["A > A1 > A1x"], [], ["A"], []])
    m = match(p, emb, kept, TREE)
    assert m.decides.tolist() == [True, False, False, False, False]
    assert [p.categories[c] for c in m.category] == ["A > A1 > A1y"] * 4 + ["A > A1 > A1y"]
    assert m.similarity[3] == pytest.approx(float(emb[3] @ unit(1, 0, 0)), rel=1e-5)

    scores = np.full((5, len(TREE)), 0.1, dtype=np.float32)
    scores[:, TREE.index["B"]] = 0.9  # the model says B for everything
    positive, closed = decide(scores, np.full(len(TREE), 0.5, np.float32), TREE)
    positive, closed = apply_matches(positive, closed, m, p, TREE)
    assert [TREE.ids[j] for j in np.flatnonzero(positive[0])] == ["A", "A > A1", "A > A1 > A1y"]
    assert closed[0, TREE.index["A > A1 > A1y"]] == pytest.approx(m.similarity[0])
    assert [TREE.ids[j] for j in np.flatnonzero(positive[2])] == ["B"]  # undecided rows keep the model's decision


def clusters(centre, n, rng):
    return np.stack([unit(*(np.asarray(centre) + 0.1 * rng.normal(size=len(centre)))) for _ in range(n)])


def test_the_probe_decides_the_most_probable_human_category_only_where_it_beats_every_class_and_agrees():
    rng = np.random.default_rng(0)
    human = {"A > A1 > A1y": clusters((1, 0, 0), 5, rng), "B > B1 > B1x": clusters((0, 0, 1), 5, rng)}
    rules = {"A > A2 > A2x": clusters((0, 1, 0), 20, rng)}
    p = build_prototypes(human, rules, min_examples=1, min_similarity=None, threshold_margin=0.0)
    probe = fit_probe(p, human, rules, c=30.0)
    assert probe.categories == p.categories
    emb = np.stack([unit(1, 0.1, 0), unit(0.1, 1, 0), unit(0, 0.1, 1), unit(0, 0.1, 1), unit(1, 0.1, 0)])
    kept = truth_matrix(TREE, [[], [], [], ["A"], ["A > A1 > A1x"]])
    m = match_probe(probe, p, emb, kept, TREE)
    # 0: A1y; 1: the rule competitor A2x is most probable; 2: B1x; 3: B1x is most probable but the
    # rules said A, so the agreeing A1y is reported and does not decide; 4: already finest-labelled
    assert m.decides.tolist() == [True, False, True, False, False]
    assert [p.categories[c] for c in m.category] == ["A > A1 > A1y", "A > A1 > A1y", "B > B1 > B1x", "A > A1 > A1y", "A > A1 > A1y"]
    probs = probe.probabilities(emb)
    assert probs.sum(axis=1) == pytest.approx(np.ones(5), rel=1e-5)
    assert m.similarity[0] == pytest.approx(probs[0, 0], rel=1e-5) and m.similarity[0] > 0.5


def test_a_probe_of_two_classes_orders_them_like_scikit_learn():
    rng = np.random.default_rng(1)
    human = {"A > A1 > A1y": clusters((1, 0), 5, rng)}
    rules = {"B > B1 > B1x": clusters((0, 1), 5, rng)}
    p = build_prototypes(human, rules, 1, None, 0.0)
    probs = fit_probe(p, human, rules, c=30.0).probabilities(np.stack([unit(1, 0.1), unit(0.1, 1)]))
    assert probs[0, 0] > 0.5 and probs[1, 1] > 0.5
    assert fit_probe(build_prototypes(human, {}, 1, None, 0.0), human, {}, c=1.0) is None  # one class: nothing to learn


def test_decided_by_prefers_human_then_rules_then_prototypes_then_model():
    human = {"A > A1 > A1y": np.stack([unit(1, 0)])}
    p = build_prototypes(human, {}, 1, 0.5, 0.0)
    m = match(p, np.stack([unit(1, 0)] * 5), np.zeros((5, len(TREE)), dtype=bool), TREE)
    m.decides[3:] = False
    got = decided_by(m, np.array([1, 0, 0, 0, 0], bool), np.array([1, 1, 0, 0, 0], bool), np.array([0, 0, 0, 1, 0], bool))
    assert got == [HUMAN, RULES, PROTOTYPES, MODEL, NONE]
    got = decided_by(m, np.zeros(5, bool), np.zeros(5, bool), np.zeros(5, bool), fewshot=PROBE)
    assert got == [PROBE, PROBE, PROBE, NONE, NONE]


def test_without_human_labels_nothing_is_decided_by_prototypes():
    p = build_prototypes({}, {"A > A2 > A2x": np.stack([unit(1, 0)])}, 1, None, 0.0)
    m = match(p, np.stack([unit(1, 0)]), np.zeros((1, len(TREE)), dtype=bool), TREE)
    assert not m.decides.any() and m.category.tolist() == [-1]


def test_review_keeps_the_products_nearest_each_threshold_one_per_product_and_caps_the_run():
    review = Review(index="r", max_per_run=3, per_category=1, few_examples_below=5, top_guesses=2)
    collector = ReviewCollector(review, TREE, "run1", "v1")
    rows = [{"id": f"p{i}", "title": f"t{i}"} for i in range(3)]
    scores = np.full((3, len(TREE)), 0.9, dtype=np.float32)
    a1y = TREE.index["A > A1 > A1y"]
    scores[:, a1y] = [0.52, 0.7, 0.45]  # p0 is nearest A1y's 0.5 threshold
    scores[1, :] = 0.0
    scores[1, a1y] = 0.7
    kept = np.zeros((3, len(TREE)), dtype=bool)
    kept[2, :] = True  # p2's labels are all known: never uncertain
    collector.add_batch(
        rows, scores, np.full(len(TREE), 0.5, np.float32), kept, ["model"] * 3, {"A > A2 > A2x": np.array([0.2, 0.95, 0.1])}, "title"
    )
    out = collector.records()
    assert len(out) <= 3 and len({r["product_id"] for r in out}) == len(out)
    by_id = {r["product_id"]: r for r in out}
    assert "p2" not in by_id
    assert by_id["p0"]["reason"] == UNCERTAIN and by_id["p0"]["distance"] == pytest.approx(0.02, abs=1e-5)
    assert by_id["p1"]["reason"] in (UNCERTAIN, FEW_EXAMPLES)
    few = ReviewCollector(Review(per_category=1, max_per_run=10), TREE, "run1", "v1")
    few.add_batch(
        rows,
        np.zeros((3, len(TREE)), np.float32),
        np.full(len(TREE), 0.99, np.float32),
        kept,
        ["none"] * 3,
        {"A > A2 > A2x": np.array([0.2, 0.95, 0.1])},
        "title",
    )
    nearest = [r for r in few.records() if r["reason"] == FEW_EXAMPLES]
    assert [(r["product_id"], r["category"], r["threshold"]) for r in nearest] == [("p1", "A > A2 > A2x", None)]
    assert [(g["id"], g["classifier"]) for g in by_id["p0"]["guesses"]] == [("A > A1 > A1x", "model"), ("A > A2 > A2x", "model")]
    assert review_doc_id("run1", "p0") == "run1:p0"
