"""Model construction, losses, tree decisions, thresholds, metrics, and the raw-input export."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tf.keras is used)

from core import inputs
from core.config import LOCAL_BEAM_RUNNER, load_config
from core.taxonomy import CategoryTree
from pipelines.preprocess import TrainingLabels
from trainer.hierarchy import best_paths, category_entries, decide
from trainer.metrics import evaluate_predictions, truth_matrix
from trainer.model import (
    CATEGORIES,
    EMBEDDING,
    METRIC_EMBEDDING,
    PROXIES,
    DenseAdam,
    LazyAdam,
    build_model,
    masked_binary_crossentropy,
    masked_sparse_crossentropy,
    proxy_crossentropy,
)
from trainer.train import TransformedSplit, choose_thresholds, make_dataset, pseudo_labels, read_split, with_examples

from conftest import REPO

pytestmark = pytest.mark.unit

TREE = CategoryTree.from_paths([("A", "A1", "A1x"), ("A", "A1", "A1y"), ("A", "A2", "A2x"), ("B", "B1", "B1x")])


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "feature_config.yaml")


@pytest.mark.parametrize("model_type,text_dim", [("linear", None), ("ffn", None), ("wide_deep", None), ("wide_deep", 6)])
def test_model_builds_with_tiny_sizes_and_one_output_per_category(cfg, model_type, text_dim):
    small = dataclasses.replace(
        cfg.replace_model(type=model_type, hidden_units=[8], text_dim=text_dim),
        inputs=tuple(dataclasses.replace(i, vocab_size=20) if i.kind == "text" else i for i in cfg.inputs),
    )
    model = build_model(small, len(TREE), {"brand": 5, "gender": 3}, {"colour": 4, "season": 2, "usage": 3}, TREE.level_columns(3))
    batch = 3
    inputs = {
        **{f"{i.name}_ids": tf.sparse.from_dense(tf.constant([[1, 2], [3, 0], [0, 0]], tf.int64)) for i in cfg.inputs_of("text")},
        **{
            f"{i.name}_weights": tf.sparse.from_dense(tf.constant([[0.5, 0.5], [1.0, 0], [0, 0]], tf.float32))
            for i in cfg.inputs_of("text")
        },
        "brand_ids": tf.constant([0, 4, 5], tf.int64),
        "gender_ids": tf.constant([0, 1, 3], tf.int64),
        "image": tf.random.normal([batch, 1280]),
        "has_image": tf.constant([1, 0, 1], tf.int64),
    }
    out = model(inputs)
    assert out[CATEGORIES].shape == (batch, len(TREE))
    assert out["colour"].shape == (batch, 4)
    assert np.all((out[CATEGORIES].numpy() >= 0) & (out[CATEGORIES].numpy() <= 1))
    # learned part and k-NN space (learned + raw projections of both text bags and the image) are unit rows
    assert out[METRIC_EMBEDDING].shape == (batch, small.embedding.dim)
    assert out[EMBEDDING].shape == (batch, small.embedding.dim + 3 * small.embedding.raw_dim)
    np.testing.assert_allclose(np.linalg.norm(out[EMBEDDING].numpy(), axis=1), 1.0, rtol=1e-5)
    assert out[PROXIES].shape == (batch, len(TREE.level_columns(3)))
    # With text_dim, each text input has one trainable table, shared by the wide and deep parts.
    tables = sorted(v.name for v in model.trainable_variables if "tfidf" in v.name)
    if text_dim:
        assert tables == ["title_chars_tfidf/kernel:0", "title_tfidf/kernel:0"]
        assert all(v.shape[1] == text_dim for v in model.trainable_variables if "tfidf" in v.name)
    elif model_type == "wide_deep":
        assert len(tables) == 4


def test_dense_adam_updates_a_sparse_gradient_as_adam_updates_its_dense_sum():
    dense_table, adam_table = tf.Variable(tf.ones([4, 2])), tf.Variable(tf.ones([4, 2]))
    dense, adam = DenseAdam(learning_rate=0.1), tf.keras.optimizers.Adam(learning_rate=0.1)
    # Row 1 twice in one gradient, row 3 once; rows 0 and 2 have a zero gradient.
    grad = tf.IndexedSlices(tf.constant([[1.0, -1.0], [0.5, 0.5], [2.0, 0.0]]), tf.constant([1, 3, 1]), tf.constant([4, 2]))
    for _ in range(3):
        dense.apply_gradients([(grad, dense_table)])
        adam.apply_gradients([(tf.convert_to_tensor(grad), adam_table)])
    np.testing.assert_allclose(dense_table.numpy(), adam_table.numpy(), rtol=1e-5)
    assert dense_table.numpy()[1, 0] < 1.0 and dense_table.numpy()[0, 0] == 1.0


def test_lazy_adam_updates_only_the_rows_of_a_sparse_gradient_and_matches_adam_on_them():
    lazy_table, adam_table = tf.Variable(tf.ones([4, 2])), tf.Variable(tf.ones([4, 2]))
    lazy, adam = LazyAdam(learning_rate=0.1), tf.keras.optimizers.Adam(learning_rate=0.1)
    # Row 1 twice in one gradient (summed), row 3 once; rows 0 and 2 untouched.
    grad = tf.IndexedSlices(tf.constant([[1.0, -1.0], [0.5, 0.5], [2.0, 0.0]]), tf.constant([1, 3, 1]), tf.constant([4, 2]))
    lazy.apply_gradients([(grad, lazy_table)])
    adam.apply_gradients([(tf.convert_to_tensor(grad), adam_table)])
    np.testing.assert_allclose(lazy_table.numpy()[[0, 2]], 1.0)
    np.testing.assert_allclose(lazy_table.numpy()[[1, 3]], adam_table.numpy()[[1, 3]], rtol=1e-6)
    dense = tf.Variable(tf.ones([2]))
    LazyAdam(learning_rate=0.1).apply_gradients([(tf.constant([1.0, 0.0]), dense)])
    assert dense.numpy()[0] < 1.0


def test_extra_examples_are_always_trained_on_and_never_scored_or_relabelled(cfg):
    from types import SimpleNamespace

    spec = {"x": tf.io.FixedLenFeature([1], tf.float32), "image": tf.io.FixedLenFeature([3], tf.float32)}  # no image: zeros
    spec.update({k: tf.io.FixedLenFeature([2], tf.float32) for k in ("labels", "label_mask")})

    def example(x):
        feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=[x]))}
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    # rows 0 and 2 rule-labelled, row 1 not; two extra rows, every class a known negative
    own = np.asarray([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]], np.uint8)
    split = TransformedSplit(("train-0",), tf.constant([example(x) for x in (0, 1, 2)]), own)
    split = with_examples(split, [example(10), example(11)], np.asarray([[0, 0, 1, 1]] * 2, np.float32))
    no_attributes = dataclasses.replace(cfg, labels=dataclasses.replace(cfg.labels, attributes=()))
    tft_output = SimpleNamespace(transformed_feature_spec=lambda: spec)

    def rows(**kwargs):
        batches = make_dataset(no_attributes, tft_output, split, 8, False, **kwargs)
        return [(float(x), t.tolist()) for f, y in batches for x, t in zip(f["x"][:, 0], y["categories"].numpy())]

    assert split.own == 3 and split.extra == 2
    assert [x for x, _ in rows(only_labelled=True)] == [0, 2, 10, 11]
    assert [x for x, _ in rows(only_labelled=False, with_extra=False)] == [0, 1, 2]
    relabelled = rows(only_labelled=True, targets=np.asarray([[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]], np.float32))
    assert relabelled == [(0, [1, 0, 1, 1]), (1, [1, 1, 1, 1]), (10, [0, 0, 1, 1]), (11, [0, 0, 1, 1])]


def test_an_image_left_out_of_its_record_is_parsed_as_zeros_and_others_need_their_values(cfg, tmp_path):
    from types import SimpleNamespace

    spec = {"x": tf.io.FixedLenFeature([1], tf.float32), "image": tf.io.FixedLenFeature([3], tf.float32)}
    spec.update({k: tf.io.FixedLenFeature([2], tf.float32) for k in ("labels", "label_mask")})

    def example(x, image):
        values = {"x": [x], "labels": [1.0, 0.0], "label_mask": [1.0, 1.0], **({"image": image} if image else {})}
        feature = {k: tf.train.Feature(float_list=tf.train.FloatList(value=v)) for k, v in values.items()}
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    # as preprocessing writes them: no image feature where the product has no photo
    images = [None, [0.5, 0.0, -1.0], None]
    (tmp_path / "transformed").mkdir()
    with tf.io.TFRecordWriter(str(tmp_path / "transformed/train-00000-of-00001.tfrecord.gz"), options="GZIP") as writer:
        for x, image in enumerate(images):
            writer.write(example(float(x), image))
    tft_output = SimpleNamespace(transformed_feature_spec=lambda: spec)

    split = read_split(tft_output, str(tmp_path), "train")
    assert split.targets.tolist() == [[1, 0, 1, 1]] * 3
    no_attributes = dataclasses.replace(cfg, labels=dataclasses.replace(cfg.labels, attributes=()))
    assert inputs.left_out_when_zero(no_attributes) == ("image",)
    ((batch, _),) = make_dataset(no_attributes, tft_output, split, 8, False, only_labelled=False)
    np.testing.assert_array_equal(batch["image"].numpy(), [[0, 0, 0], [0.5, 0, -1], [0, 0, 0]])
    np.testing.assert_array_equal(batch["x"].numpy()[:, 0], [0.0, 1.0, 2.0])
    # only the features left out when zero have a default: a record without x is an error
    without_x = TransformedSplit(("train-0",), tf.constant([tf.train.Example().SerializeToString()]), np.ones((1, 4), np.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError):
        list(make_dataset(no_attributes, tft_output, without_x, 8, False, only_labelled=False))


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


def test_proxy_loss_is_the_cross_entropy_of_the_finest_labels_and_zero_without_one():
    leaves = TREE.level_columns(3)  # A1x, A1y, A2x, B1x
    labels = truth_matrix(TREE, [["A > A1 > A1y"], ["A > A1"], ["A > A1 > A1x", "A > A2 > A2x"]]).astype(np.float32)
    target = tf.constant(np.concatenate([labels, np.ones_like(labels)], axis=1))
    probs = tf.constant([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.5, 0.1, 0.2, 0.2]])
    loss = proxy_crossentropy(leaves)(target, probs).numpy()
    assert loss[0] == pytest.approx(-np.log(0.6), rel=1e-5)
    assert loss[1] == 0.0  # no finest-level label: nothing to pull towards
    assert loss[2] == pytest.approx(-(np.log(0.5) + np.log(0.2)) / 2, rel=1e-5)  # two leaves share the target


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
    assert category_entries(closed[0], positive[0], TREE, best_paths(closed, TREE)[0]) == entries  # the batch's path, as predict passes it


def test_kept_rule_labels_are_positive_and_the_model_adds_what_they_miss():
    scores = _scores(A=0.2, A_A1=0.3, A_A1_A1x=0.1, B=0.9, B_B1=0.9, B_B1_B1x=0.9)
    rules = truth_matrix(TREE, [["A > A1"]])
    positive, closed = decide(scores, np.full(len(TREE), 0.5, np.float32), TREE, rules)
    assert [TREE.ids[i] for i in np.flatnonzero(positive[0])] == ["A", "B", "A > A1", "B > B1", "B > B1 > B1x"]
    assert closed[0, TREE.index["A > A1"]] == 1.0 and closed[0, TREE.index["A > A1 > A1x"]] == pytest.approx(0.1)


def test_thresholds_reach_target_precision_on_known_labels():
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.4]], dtype=np.float32)
    labels = np.array([[1], [1], [0], [1], [0]], dtype=np.float32)
    mask = np.ones_like(labels)
    assert choose_thresholds(scores, labels, mask, 1.0, 0.3)[0] == pytest.approx(0.8)
    assert choose_thresholds(scores, labels, mask, 0.75, 0.3)[0] == pytest.approx(0.6)
    mask[2] = 0  # the 0.7 negative is unknown, not a negative
    assert choose_thresholds(scores, labels, mask, 1.0, 0.3)[0] == pytest.approx(0.6)
    mask[2] = 1  # no target: the best-F1 threshold (0.6: F1 6/7 against 0.8 at 4/5)
    assert choose_thresholds(scores, labels, mask, None, 0.3)[0] == pytest.approx(0.6)


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
    from core import storage
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


def test_pseudo_labels_fill_only_what_rules_left_open_and_agree_with_them():
    rules = [["A > A1 > A1x"], ["A > A1"], [], []]
    labels, masks = TrainingLabels(TREE)(rules)
    scores = np.zeros((4, len(TREE)), np.float32)
    leaf = {name: TREE.index[name] for name in ("A > A1 > A1x", "A > A1 > A1y", "A > A2 > A2x", "B > B1 > B1x")}
    scores[0, leaf["B > B1 > B1x"]] = 0.99  # a rule label at the finest level is kept whatever the score
    scores[1, [leaf["A > A1 > A1y"], leaf["B > B1 > B1x"]]] = [0.95, 0.99]  # B1x disagrees with the rule "A > A1"
    scores[2, [leaf["B > B1 > B1x"], leaf["A > A2 > A2x"]]] = [0.97, 0.5]
    scores[3, leaf["A > A2 > A2x"]] = 0.6  # below min_score: stays unlabelled
    targets, added = pseudo_labels(scores, labels, masks, TREE, min_score=0.9)
    assert added == 2
    new_labels, new_masks = np.split(targets, 2, axis=1)
    np.testing.assert_array_equal(new_labels[0], labels[0])
    np.testing.assert_array_equal(new_masks[0], masks[0])
    np.testing.assert_array_equal(new_labels[1], truth_matrix(TREE, [["A > A1 > A1y"]])[0])
    np.testing.assert_array_equal(new_labels[2], truth_matrix(TREE, [["B > B1 > B1x"]])[0])
    assert new_masks[1].all() and new_masks[2].all()
    np.testing.assert_array_equal(new_labels[3], labels[3])
    np.testing.assert_array_equal(new_masks[3], masks[3])
    assert targets.dtype == np.uint8
    for chunk_rows in (1, 3):  # a chunk boundary inside the four examples
        chunked, chunked_added = pseudo_labels(scores, labels, masks, TREE, 0.9, chunk_rows)
        np.testing.assert_array_equal(chunked, targets)
        assert chunked_added == added


SYNTHETIC_WORDS = {"A > A1 > A1x": "alpha tee", "A > A1 > A1y": "alpha shirt", "A > A2 > A2x": "kilt", "B > B1 > B1x": "beta shoe"}


def synthetic_rules(true: str, n: int) -> list:
    """Rules label 3 products in 5 at the finest level, 1 only at level 2, and miss 1."""
    return [] if n % 5 == 0 else [true.rsplit(" > ", 1)[0]] if n % 5 == 4 else [true]


@pytest.fixture(scope="module")
def trained(cfg, tmp_path_factory):
    """A synthetic catalogue (no images) preprocessed by the real pipeline, and a small model
    trained on it with self-training, golden-set thresholds and null-evidence examples.
    Records which transformed files each dataset of the training run was built from."""
    import gzip

    from core import storage
    from pipelines.preprocess import preprocess
    from trainer import train as train_module

    root = tmp_path_factory.mktemp("tiny")
    small = cfg.replace_model(
        hidden_units=[16],
        epochs=30,
        batch_size=16,
        learning_rate=0.01,
        self_training_rounds=1,
        self_training_min_score=0.5,
        self_training_epochs=2,
        null_evidence_share=0.1,
        threshold_labels="golden",
    )
    small = dataclasses.replace(small, inputs=tuple(i for i in small.inputs if i.kind != "image"))
    docs = []
    for n in range(240):
        true, words = list(SYNTHETIC_WORDS.items())[n % 4]
        title = f"Brand{n % 7} {'Men' if n % 2 else 'Women'} {['Red', 'Blue', 'Green'][n % 3]} {words}"
        docs.append(
            {
                "id": f"p{n}",
                "title": title,
                "gender": "Men" if n % 2 else "Women",
                "base_colour": "Red",
                "season": "Summer",
                "usage": "Casual",
                "true_category": true,
                "rule_categories": synthetic_rules(true, n),
            }
        )
    with storage.atomic_stage(str(root / "dump")) as tmp:
        with gzip.open(f"{tmp}/products-00000-of-00001.jsonl.gz", "wb") as f:
            f.write(b"\n".join(json.dumps(d).encode() for d in docs) + b"\n")
        storage.write_json(f"{tmp}/categories.json", TREE.to_records())
    preprocess(small, str(root / "dump"), str(root / "pre"), str(root / "cache"), [f"--runner={LOCAL_BEAM_RUNNER}"])

    built = []
    original = train_module.make_dataset

    def recording_make_dataset(cfg_, tft_output, split, batch_size, shuffle, only_labelled, targets=None, with_extra=True):
        built.append({"files": list(split.files), "shuffle": shuffle})
        return original(cfg_, tft_output, split, batch_size, shuffle, only_labelled, targets, with_extra)

    train_module.make_dataset = recording_make_dataset
    try:
        card = train_module.train(small, str(root / "pre"), str(root / "model"), "v1", "r1")
    finally:
        train_module.make_dataset = original
    return small, str(root / "model"), card, built


def test_self_training_never_trains_on_the_test_split(trained):
    _, _, card, built = trained
    assert card["self_training"] and card["self_training"][0]["pseudo_labelled"] > 0
    training = [d for d in built if d["shuffle"]]
    assert len(training) == 2  # the first fit and the self-training round
    for d in built:
        assert d["files"] and not any("/test-" in f for f in d["files"])
    assert all(f.rsplit("/", 1)[1].startswith("train-") for d in training for f in d["files"])


def test_a_title_of_only_unknown_tokens_is_not_confident(trained):
    from trainer.serving import ServingModel, raw_batch

    small, model_dir, _, _ = trained
    model = ServingModel.load(model_dir)
    rows = [{"title": "👕 衬衫 シャツ", "gender": "Men"}, {"title": "Brand3 Men Red kilt", "gender": "Men"}]
    scores = model.predict(raw_batch(small, rows))["category_scores"]
    positive, closed = decide(scores, model.thresholds, model.tree)
    unknown, known = (category_entries(closed[i], positive[i], model.tree) for i in range(2))
    assert not any(e["confident"] for e in unknown)
    # the control: a known title's best path is its category, scored far above anything unknown
    assert [e["id"] for e in known if e["score"] == max(x["score"] for x in known if x["level"] == e["level"])][-1] == "A > A2 > A2x"
    assert scores[1, model.tree.index["A > A2 > A2x"]] > 10 * scores[0].max()


def greedy_path(scores, tree):
    """The top-down path one product at a time: the first highest-scoring child at each level."""
    path, candidates = [], [cid for cid in tree.ids if tree.nodes[cid].parent is None]
    while candidates:
        best = max(candidates, key=lambda cid: scores[tree.index[cid]])
        path.append(tree.index[best])
        candidates = tree.children(best)
    return path


@pytest.mark.parametrize("tree", [TREE, CategoryTree.from_paths([("A", "A1", "A1x"), ("A", "A2"), ("B",), ("B", "B1", "B1x")])])
def test_best_paths_of_a_batch_are_each_products_greedy_path(tree):
    rng = np.random.default_rng(0)
    scores = rng.choice([0.1, 0.5, 0.9], size=(200, len(tree))).astype(np.float32)  # many ties
    assert best_paths(scores, tree) == [greedy_path(row, tree) for row in scores]
