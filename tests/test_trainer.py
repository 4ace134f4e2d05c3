"""Model construction, losses, tree decisions, thresholds, metrics, and the raw-input export."""
import dataclasses

import numpy as np
import pytest
import tensorflow_transform  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tf.keras is used)
import tensorflow as tf

from pipelines.config import load_config
from pipelines.taxonomy import CategoryTree
from trainer.hierarchy import category_entries, decide
from trainer.metrics import evaluate_predictions, truth_matrix
from trainer.model import CATEGORIES, build_model, masked_binary_crossentropy, masked_sparse_crossentropy
from trainer.train import choose_thresholds

from conftest import REPO

TREE = CategoryTree.from_paths([("A", "A1", "A1x"), ("A", "A1", "A1y"), ("A", "A2", "A2x"), ("B", "B1", "B1x")])


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "feature_config.yaml")


@pytest.mark.parametrize("model_type", ["linear", "ffn", "wide_deep"])
def test_model_builds_with_tiny_sizes_and_one_output_per_category(cfg, model_type):
    small = dataclasses.replace(cfg.replace_model(type=model_type, hidden_units=[8]),
                                inputs=tuple(dataclasses.replace(i, vocab_size=20) if i.kind == "text" else i for i in cfg.inputs))
    model = build_model(small, len(TREE), {"brand": 5, "gender": 3}, {"colour": 4, "season": 2, "usage": 3})
    batch = 3
    inputs = {
        "title_ids": tf.sparse.from_dense(tf.constant([[1, 2], [3, 0], [0, 0]], tf.int64)),
        "title_weights": tf.sparse.from_dense(tf.constant([[0.5, 0.5], [1.0, 0], [0, 0]], tf.float32)),
        "brand_ids": tf.constant([0, 4, 5], tf.int64),
        "gender_ids": tf.constant([0, 1, 3], tf.int64),
        "image": tf.random.normal([batch, 1280]),
        "has_image": tf.constant([1, 0, 1], tf.int64),
    }
    out = model(inputs)
    assert out[CATEGORIES].shape == (batch, len(TREE))
    assert out["colour"].shape == (batch, 4)
    assert np.all((out[CATEGORIES].numpy() >= 0) & (out[CATEGORIES].numpy() <= 1))


def test_attribute_head_loss_is_zero_where_label_missing():
    probs = tf.constant([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    loss = masked_sparse_crossentropy(tf.constant([-1, 2]), probs).numpy()
    assert loss[0] == 0.0
    assert loss[1] == pytest.approx(-np.log(0.8), rel=1e-5)


def test_category_loss_ignores_masked_classes():
    labels = tf.constant([[1.0, 0.0, 0.0]])
    pred = tf.constant([[0.9, 0.99, 0.1]])
    full = masked_binary_crossentropy(tf.concat([labels, [[1.0, 1.0, 1.0]]], axis=1), pred).numpy()[0]
    masked = masked_binary_crossentropy(tf.concat([labels, [[1.0, 0.0, 1.0]]], axis=1), pred).numpy()[0]
    assert masked == pytest.approx((-np.log(0.9) - np.log(0.9)) / 2, rel=1e-4)
    assert full > masked


def _scores(**by_id):
    s = np.zeros((1, len(TREE)), dtype=np.float32)
    for cid, v in by_id.items():
        s[0, TREE.index[cid.replace("_", " > ")]] = v
    return s


def test_positive_below_implies_ancestors_with_at_least_its_score():
    scores = _scores(A=0.1, A_A1=0.2, A_A1_A1x=0.9)
    positive, closed = decide(scores, np.full(len(TREE), 0.5, np.float32), TREE)
    on = {TREE.ids[i] for i in np.flatnonzero(positive[0])}
    assert on == {"A", "A > A1", "A > A1 > A1x"}
    assert closed[0, TREE.index["A"]] == pytest.approx(0.9)


def test_negative_below_never_removes_positive_above():
    scores = _scores(B=0.95, B_B1=0.1, B_B1_B1x=0.05)
    positive, _ = decide(scores, np.full(len(TREE), 0.5, np.float32), TREE)
    assert {TREE.ids[i] for i in np.flatnonzero(positive[0])} == {"B"}
    entries = category_entries(scores[0], positive[0], TREE)
    assert [(e["id"], e["confident"]) for e in entries] == [("B", True)]


def test_no_positive_gives_the_most_likely_path_flagged_unconfident():
    scores = _scores(A=0.3, B=0.2, A_A2=0.25, A_A1=0.1, A_A2_A2x=0.2)
    positive, closed = decide(scores, np.full(len(TREE), 0.5, np.float32), TREE)
    entries = category_entries(closed[0], positive[0], TREE)
    assert [e["id"] for e in entries] == ["A", "A > A2", "A > A2 > A2x"]
    assert not any(e["confident"] for e in entries)


def test_thresholds_reach_target_precision_on_known_labels():
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.4]], dtype=np.float32)
    labels = np.array([[1], [1], [0], [1], [0]], dtype=np.float32)
    mask = np.ones_like(labels)
    assert choose_thresholds(scores, labels, mask, 1.0, 0.3)[0] == pytest.approx(0.8)
    assert choose_thresholds(scores, labels, mask, 0.75, 0.3)[0] == pytest.approx(0.6)
    mask[2] = 0  # the 0.7 negative is unknown, not a negative
    assert choose_thresholds(scores, labels, mask, 1.0, 0.3)[0] == pytest.approx(0.6)


def test_metrics_against_truth_per_level_and_hierarchical():
    truth = truth_matrix(TREE, [["A > A1 > A1x"], ["B > B1 > B1x"]])
    scores = np.zeros((2, len(TREE)), np.float32)
    for cid in ("A", "A > A1", "A > A1 > A1y"):
        scores[0, TREE.index[cid]] = 0.9
    scores[1, TREE.index["B"]] = 0.9
    positive = scores >= 0.5
    m = evaluate_predictions(scores, positive, truth, TREE)
    assert m["levels"]["1"]["micro_f1"] == 1.0
    assert m["levels"]["2"]["micro_precision"] == 1.0 and m["levels"]["2"]["micro_recall"] == 0.5
    assert m["levels"]["3"]["micro_f1"] == 0.0
    assert m["hierarchical_precision"] == pytest.approx(3 / 4)
    assert m["hierarchical_recall"] == pytest.approx(3 / 6)
    assert m["precision_at_1"] == 1.0


def test_blessing_gate_keeps_the_better_model_unless_forced(tmp_path):
    from pipelines import storage
    from trainer.evaluate import bless

    blessed_path = str(tmp_path / "blessed.json")
    metric = "ground_truth.hierarchical_f1"

    def metrics(value, version):
        return {"model_version": version, "ground_truth": {"hierarchical_f1": value}}

    assert bless(metrics(0.8, "v1"), metric, blessed_path, "m/v1", force=False)["blessed"]
    worse = bless(metrics(0.7, "v2"), metric, blessed_path, "m/v2", force=False)
    assert not worse["blessed"] and worse["previous"]["model_dir"] == "m/v1"
    assert storage.read_json(blessed_path)["model_dir"] == "m/v1"
    assert bless(metrics(0.8, "v1"), metric, blessed_path, "m/v1", force=False)["blessed"]
    assert bless(metrics(0.7, "v2"), metric, blessed_path, "m/v2", force=True)["blessed"]
    assert storage.read_json(blessed_path)["model_dir"] == "m/v2"
    assert bless(metrics(0.75, "v3"), metric, blessed_path, "m/v3", force=False)["blessed"]
