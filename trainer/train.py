"""Training: transformed examples -> fitted model -> per-category thresholds -> exported model folder.

The export is a SavedModel whose ``serving_default`` takes raw features (TFT's transform
graph inside) plus a model card holding the categories, thresholds and data run.

Labels: the rule labels of the train split, closed under ancestors, plus (``model.self_training_rounds``)
the model's own confident finest-level predictions on train products the rules left open, plus
(``model.null_evidence_share``) synthetic products without a known token, negative everywhere.
Ground truth is never a training label. With ``model.threshold_labels: golden`` the eval split's
ground truth (a small golden set) chooses the per-category thresholds and judges each
self-training round; the evaluation stage reports on the test split, which training never reads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from core import features, inputs, storage
from core.config import FeatureConfig
from core.rows import RULE_CATEGORIES, read_clean_rows
from core.taxonomy import CategoryTree
from trainer import serving
from trainer.hierarchy import decide
from trainer.metrics import evaluate_predictions, truth_matrix
from trainer.model import CATEGORIES, EMBEDDING, METRIC_EMBEDDING, PROXIES, build_model

log = logging.getLogger(__name__)

SCORING_BATCH = 1024  # inference only: no gradients, larger batches


def transformed_files(preprocess_dir: str, split: str) -> list[str]:
    return storage.list_files(storage.join(preprocess_dir, "transformed"), f"{split}-*.tfrecord.gz")


@dataclasses.dataclass(frozen=True)
class TransformedSplit:
    """One split's serialized transformed examples, read once into memory, and their stored
    ``[labels | mask]`` (rule labels; 0/1, so uint8) in file order; the last ``extra`` targets are
    of synthetic examples added once per training (:func:`with_examples`), every class a known
    negative. Those are kept apart, so adding them does not copy the split's records."""

    files: Tuple[str, ...]
    records: Any  # tf.string tensor [own examples]
    targets: np.ndarray  # uint8 [own + extra examples, 2 * categories]
    extra_records: Any = None  # tf.string tensor [extra examples]

    @property
    def own(self) -> int:
        """How many rows are the split's own examples (the first ones)."""
        return int(self.records.shape[0])

    @property
    def extra(self) -> int:
        return len(self.targets) - self.own

    def gather(self, index):
        """The serialized records at ``index`` (a tensor of row numbers: own rows, then extra ones)."""
        import tensorflow as tf

        if not self.extra:
            return tf.gather(self.records, index)
        own = tf.gather(self.records, tf.minimum(index, self.own - 1))
        extra = tf.gather(self.extra_records, tf.maximum(index - self.own, 0))
        return tf.where(index < self.own, own, extra)


def read_split(tft_output, preprocess_dir: str, split: str) -> TransformedSplit:
    """Reads ``split``'s transformed TFRecords once: every fit and scoring pass of a training
    run reuses them instead of decompressing the files again."""
    import tensorflow as tf

    files = transformed_files(preprocess_dir, split)
    full = tft_output.transformed_feature_spec()
    spec = {k: full[k] for k in (features.LABELS, features.LABEL_MASK)}
    width = 2 * spec[features.LABELS].shape[0]
    records, targets = [], []
    for batch in tf.data.TFRecordDataset(files, compression_type="GZIP").batch(4096):
        ex = tf.io.parse_example(batch, spec)
        targets.append(tf.concat([ex[features.LABELS], ex[features.LABEL_MASK]], axis=-1).numpy().astype(np.uint8))
        records.append(batch)
    return TransformedSplit(
        tuple(files),
        tf.concat(records, axis=0) if records else tf.constant([], tf.string),
        np.concatenate(targets) if targets else np.zeros((0, width), dtype=np.uint8),
    )


def with_examples(split: TransformedSplit, serialized: List[bytes], targets: np.ndarray) -> TransformedSplit:
    """``split`` with ``serialized`` examples (and their 0/1 ``targets``) as its extra rows: one copy
    of them per training, however many datasets are made of it."""
    import tensorflow as tf

    return TransformedSplit(
        split.files,
        split.records,
        np.concatenate([split.targets, targets.astype(np.uint8, copy=False)]),
        tf.constant(serialized, tf.string),
    )


def make_dataset(
    cfg: FeatureConfig,
    tft_output,
    split: TransformedSplit,
    batch_size: int,
    shuffle: bool,
    only_labelled: bool,
    targets: Optional[np.ndarray] = None,
    with_extra: bool = True,
):
    """(features, labels) batches of ``split``; the category target is ``[labels | mask]``.

    ``targets`` (``[the split's own examples in file order, 2 * categories]``) replaces their
    stored rule labels and masks, e.g. with self-training's pseudo-labels; the extra rows keep
    theirs and, with ``with_extra``, are always included (``only_labelled`` does not drop them).

    Batches are gathered from the records in memory by a shuffled index (a full shuffle each
    epoch, no element copies into a shuffle buffer), then parsed a batch at a time: one
    ``parse_example`` per batch instead of one per record.
    """
    import tensorflow as tf

    spec = inputs.transformed_spec(cfg, tft_output.transformed_feature_spec())
    if targets is None:
        targets = split.targets
    else:
        targets = np.concatenate([targets.astype(np.uint8, copy=False), split.targets[split.own :]])
    keep = targets[:, : targets.shape[1] // 2].sum(axis=1) > 0 if only_labelled else np.ones(len(targets), dtype=bool)
    keep[split.own :] = with_extra
    kept = np.flatnonzero(keep)
    targets = tf.constant(targets)
    ds = tf.data.Dataset.from_tensor_slices(kept)
    if shuffle:
        ds = ds.shuffle(len(kept), seed=cfg.model.seed, reshuffle_each_iteration=True)
    spec = {k: v for k, v in spec.items() if k not in (features.LABELS, features.LABEL_MASK)}

    def parse(index):
        ex = tf.io.parse_example(split.gather(index), spec)
        batch_targets = tf.cast(tf.gather(targets, index), tf.float32)
        labels = {CATEGORIES: batch_targets, PROXIES: batch_targets}
        for attr in cfg.labels.attributes:
            labels[attr.name] = ex.pop(features.attribute_key(attr.name))
        return ex, labels

    # Fixed parallelism instead of tf.data's autotuning: destroying an autotuned iterator waited for
    # its tuning thread to finish a sleep that doubles after each tuning round (10 ms up to 60 s),
    # which stalled the end of a 25 s fit by 12 to 30 s (gdb: ~RootDataset::Iterator waiting on
    # Model::OptimizeLoop).
    options = tf.data.Options()
    options.autotune.enabled = False
    parallel = max(2, os.cpu_count() or 2)
    return ds.batch(batch_size).map(parse, num_parallel_calls=parallel, deterministic=True).prefetch(2).with_options(options)


def null_evidence_examples(cfg: FeatureConfig, tft_output, num_categories: int, count: int, seed: int) -> Tuple[List[bytes], np.ndarray]:
    """``count`` serialized transformed examples and their targets of products with no evidence: a title of words in a script
    the catalogue does not use (no known token), each categorical value or none, no image.
    Every category is a known negative and attributes are absent, so the model learns that a
    product it knows nothing about belongs nowhere confidently."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    texts = {i.source: i for i in cfg.inputs_of("text")}

    def vocabulary(name: str) -> List[str]:
        return [v.decode() if isinstance(v, bytes) else v for v in tft_output.vocabulary_by_name(name)]

    raw: Dict[str, Any] = {}
    for inp in cfg.inputs:
        # a source that a text input reads gets unknown words, whichever input reads it first
        owner = texts.get(inp.source, inp)
        kind = inputs.KINDS[owner.kind]
        if set(kind.raw_features(owner)) <= set(raw):
            continue
        raw.update({k: tf.constant(v) for k, v in kind.unknown_values(owner, count, rng, vocabulary).items()})
    examples = dict(tft_output.transform_features_layer()(raw))
    for attr in cfg.labels.attributes:
        examples[features.attribute_key(attr.name)] = tf.fill([count], tf.constant(-1, tf.int64))
    serialized = serialize_examples(examples, count, tft_output.transformed_feature_spec())
    # Every category is a known negative.
    targets = np.concatenate([np.zeros((count, num_categories)), np.ones((count, num_categories))], axis=1).astype(np.float32)
    return serialized, targets


def serialize_examples(examples: Dict[str, Any], count: int, spec: Dict[str, Any]) -> List[bytes]:
    """A batch of ``count`` transformed examples as serialized ``tf.train.Example`` records of
    ``spec``'s features, labels and masks excepted (they travel as targets)."""
    import tensorflow as tf

    rows: List[Dict[str, list]] = [{} for _ in range(count)]
    for key in spec:
        if key in (features.LABELS, features.LABEL_MASK):
            continue
        value = examples[key]
        if isinstance(value, tf.SparseTensor):
            row_of, values = value.indices.numpy()[:, 0], value.values.numpy()
            per_row = [values[row_of == r].tolist() for r in range(count)]
        else:
            per_row = value.numpy().reshape(count, -1).tolist()
        for r in range(count):
            rows[r][key] = per_row[r]

    def feature(key: str, values: list) -> tf.train.Feature:
        if spec[key].dtype == tf.int64:
            return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))

    return [
        tf.train.Example(features=tf.train.Features(feature={k: feature(k, v) for k, v in row.items()})).SerializeToString() for row in rows
    ]


def choose_thresholds(
    scores: np.ndarray, labels: np.ndarray, mask: np.ndarray, target_precision: Optional[float], min_threshold: float
) -> np.ndarray:
    """Per category: the lowest threshold (>= ``min_threshold``) whose precision on the known
    eval labels reaches ``target_precision``; else (or with no target) the best-F1 one; 0.5
    without positives."""
    thresholds = np.full(scores.shape[1], 0.5, dtype=np.float32)
    for c in range(scores.shape[1]):
        known = mask[:, c] > 0
        s, y = scores[known, c], labels[known, c] > 0
        if y.sum() == 0:
            continue
        order = np.argsort(-s, kind="stable")
        s, y = s[order], y[order]
        tp = np.cumsum(y)
        precision = tp / np.arange(1, len(y) + 1)
        f1 = 2 * tp / (np.arange(1, len(y) + 1) + y.sum())
        ok = (s >= min_threshold) & (precision >= (target_precision if target_precision is not None else np.inf))
        if ok.any():
            thresholds[c] = s[np.flatnonzero(ok)[-1]]
        else:
            allowed = s >= min_threshold
            thresholds[c] = s[np.argmax(np.where(allowed, f1, -1))] if allowed.any() else 1.0
    return thresholds


def serving_function(model, tft_output, cfg: FeatureConfig) -> Callable[..., Dict[str, Any]]:
    """Raw features -> TFT graph -> ``model``: what the export serves and the golden set is scored
    with, traced once on the serving signature's specs (batch size unknown). Scoring batches of
    their own shapes traced it again per shape, and the export once more."""
    import tensorflow as tf

    model.tft_layer = tft_output.transform_features_layer()
    model_input_names = set(model.input_names)

    @tf.function
    def serve(**raw):
        transformed = model.tft_layer(raw)
        outputs = model({k: v for k, v in transformed.items() if k in model_input_names}, training=False)
        return {
            "category_scores": outputs[CATEGORIES],
            serving.EMBEDDING: outputs[EMBEDDING],
            serving.METRIC_EMBEDDING: outputs[METRIC_EMBEDDING],
            **{f"{a.name}_probs": outputs[a.name] for a in cfg.labels.attributes},
        }

    return serve.get_concrete_function(**serving.serving_input_specs(cfg))


def export_model(model, serve: Callable[..., Dict[str, Any]], export_dir: str) -> None:
    """Saves ``model`` behind ``serve`` (:func:`serving_function`) as its raw-input signature."""
    # Only the signature is served (never reloaded as Keras): no optimizer slots (half the size)
    # and no traced Keras call functions per layer (export 4.6-6.6 s -> 1.4 s).
    model.save(export_dir, save_format="tf", signatures={"serving_default": serve}, include_optimizer=False, save_traces=False)


def score_rows(serve: Callable[..., Dict[str, Any]], cfg: FeatureConfig, rows: Sequence[dict], batch_size: int = 1024) -> np.ndarray:
    """Category scores ``[len(rows), C]`` of clean rows through the raw-input function."""
    import tensorflow as tf

    out = [
        serve(**{k: tf.constant(v) for k, v in serving.raw_batch(cfg, rows[i : i + batch_size]).items()})["category_scores"].numpy()
        for i in range(0, len(rows), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def category_scorer(model) -> Callable[[Any], Any]:
    """The model's category scores as one tf.function, so that every scoring pass of a training
    (one per self-training round) reuses its traces instead of tracing the model again."""
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=False)[CATEGORIES], reduce_retracing=True)


def score_examples(scorer: Callable[[Any], Any], ds) -> np.ndarray:
    """Category scores (a :func:`category_scorer`) of every example of a :func:`make_dataset`
    dataset, in order."""
    scores = [scorer(x).numpy() for x, _ in ds]
    return np.concatenate(scores) if scores else np.zeros((0, 0), dtype=np.float32)


def pseudo_labels(
    scores: np.ndarray, labels: np.ndarray, masks: np.ndarray, tree: CategoryTree, min_score: float, chunk_rows: int = 4096
) -> Tuple[np.ndarray, int]:
    """Self-training targets ``[labels | mask]`` (uint8) and how many examples got a pseudo-label.

    An example whose rule labels stop above the finest categories (or that has none) takes
    the best-scoring leaf that agrees with its rule labels, when that leaf scores at least
    ``min_score``: the leaf and its ancestors become positives and every class is known.
    Other examples keep their rule labels and mask. Computed ``chunk_rows`` examples at a time:
    whole-split float32 intermediates set training's peak memory (memray at 3x the catalogue).
    """
    leaves = np.array([tree.index[c] for c in tree.ids if not tree.children(c)])
    ancestors = tree.ancestor_matrix()
    path = np.zeros((len(leaves), len(tree)), dtype=bool)  # leaf -> itself and its ancestors
    for row, leaf in enumerate(leaves):
        path[row, ancestors[leaf]] = True
    # A float32 product counts exactly here (at most C) and goes through BLAS; numpy's int64 one
    # does not (0.88 s against 0.05 s a round on the catalogue).
    off_path = (~path).T.astype(np.float32)
    width = labels.shape[1]
    targets = np.empty((len(labels), 2 * width), dtype=np.uint8)
    added = 0
    for start in range(0, len(labels), chunk_rows):
        rows = slice(start, start + chunk_rows)
        positive = labels[rows] > 0
        has_leaf = positive[:, leaves].any(axis=1)
        agrees = (positive.astype(np.float32) @ off_path) == 0  # [rows, leaves]: no rule label off the leaf's path
        leaf_scores = np.where(agrees, scores[rows][:, leaves], -1.0)
        best = np.argmax(leaf_scores, axis=1)
        chosen = ~has_leaf & (leaf_scores[np.arange(len(best)), best] >= min_score)
        targets[rows, :width] = np.where(chosen[:, None], path[best], labels[rows])
        targets[rows, width:] = np.where(chosen[:, None], 1, masks[rows])
        added += int(chosen.sum())
    return targets, added


def vocabulary_sizes(cfg: FeatureConfig, tft_output) -> Tuple[Dict[str, int], Dict[str, int], Dict[str, list]]:
    vocab = {i.name: tft_output.vocabulary_size_by_name(i.name) for i in cfg.inputs_of("categorical")}
    attr_vocab = {
        a.name: [v.decode() if isinstance(v, bytes) else v for v in tft_output.vocabulary_by_name(features.attribute_key(a.name))]
        for a in cfg.labels.attributes
    }
    return vocab, {k: max(len(v), 1) for k, v in attr_vocab.items()}, attr_vocab


def golden_set(cfg: FeatureConfig, preprocess_dir: str, tree: CategoryTree) -> Tuple[List[dict], np.ndarray]:
    """The eval split's clean rows and their ground truth ``[N, C]``: the small golden set that may
    choose thresholds and judge self-training rounds. It is never a training label, and the
    test split is never read."""
    rows = list(read_clean_rows(preprocess_dir, split="eval"))
    field = cfg.labels.ground_truth_field
    return rows, truth_matrix(tree, [[r[field]] if r.get(field) else [] for r in rows])


def eval_thresholds(
    scorer: Callable[[Any], Any],
    serve: Callable[..., Dict[str, Any]],
    cfg: FeatureConfig,
    eval_ds,
    golden: Optional[Tuple[List[dict], np.ndarray]],
    tree: CategoryTree,
) -> Tuple[np.ndarray, dict]:
    """Per-category thresholds from eval data, and the eval metrics they give: against the
    golden set's ground truth where ``model.threshold_labels`` is ``golden``, else against
    the known rule labels of the eval split."""
    m = cfg.model
    rules = None
    if golden is not None:
        rows, truth = golden
        scores, mask = score_rows(serve, cfg, rows), np.ones(truth.shape, dtype=np.float32)
        if m.keep_rule_labels:
            rules = truth_matrix(tree, [[c for c in r.get(RULE_CATEGORIES) or [] if c in tree] for r in rows])
            scores = np.where(rules, np.float32(1.0), scores)
    else:
        scores = score_examples(scorer, eval_ds)
        labels, mask = np.split(np.concatenate([y[CATEGORIES].numpy() for _, y in eval_ds]), 2, axis=1)
        truth = labels > 0
    if len(scores) == 0:
        return np.full(len(tree), 0.5, dtype=np.float32), {}
    thresholds = choose_thresholds(scores, truth.astype(np.float32), mask, m.target_precision, m.min_threshold)
    positive, closed = decide(scores, thresholds, tree, rules)
    return thresholds, evaluate_predictions(closed, positive, truth, tree)


def epoch_progress(examples_per_epoch: int, epochs: int, label: str):
    """A Keras callback that logs each epoch: i/n, losses, examples/s, seconds (training steps
    plus the epoch's validation) and the ETA of the remaining epochs if none stops early."""
    import tensorflow as tf

    class EpochProgress(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = 0.0
            self.epochs_run = 0
            self.started = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            took = time.perf_counter() - self.started
            self.seconds += took
            self.epochs_run += 1
            logs = logs or {}
            eta = (epochs - epoch - 1) * self.seconds / self.epochs_run
            log.info(
                "%s epoch %d/%d: loss %.4f, val category loss %.4f, %.0f examples/s, %.1f s, ETA %.0f s",
                label,
                epoch + 1,
                epochs,
                logs.get("loss", float("nan")),
                logs.get(f"val_{CATEGORIES}_loss", float("nan")),
                examples_per_epoch / max(took, 1e-9),
                took,
                eta,
            )

    return EpochProgress()


def fit(model, train_ds, eval_ds, epochs: int, examples_per_epoch: int, label: str) -> Tuple[Dict[str, List[float]], float]:
    """Fits with early stopping on the eval category loss (best weights kept); returns the
    history and the wall-clock seconds of ``model.fit``."""
    import tensorflow as tf

    stop = tf.keras.callbacks.EarlyStopping(monitor=f"val_{CATEGORIES}_loss", patience=2, restore_best_weights=True)
    started = time.perf_counter()
    # One iterator over a repeated dataset, not Keras's one per epoch of a finite dataset: adopted
    # while destroying an (autotuned) iterator cost about a second; it also fixes the shuffle order
    # the quality figures were measured with.
    history = model.fit(
        train_ds.repeat(),
        steps_per_epoch=int(train_ds.cardinality()),
        validation_data=eval_ds,
        epochs=epochs,
        verbose=0,
        callbacks=[stop, epoch_progress(examples_per_epoch, epochs, label)],
    )
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}, time.perf_counter() - started


def finest_micro_f1(metrics: dict) -> Optional[float]:
    levels = metrics.get("levels") or {}
    return round(levels[max(levels, key=int)]["micro_f1"], 4) if levels else None


def train(cfg: FeatureConfig, preprocess_dir: str, out_dir: str, model_version: str, run_id: str) -> dict:
    """Fits ``cfg.model`` (then its self-training rounds), sets thresholds on eval data, exports
    into ``out_dir``; returns the card. Only the train split is trained on."""
    import tensorflow as tf
    import tensorflow_transform as tft

    storage.require_complete(preprocess_dir)
    m = cfg.model
    tf.keras.utils.set_random_seed(m.seed)
    tf.config.experimental.enable_op_determinism()
    tft_output = tft.TFTransformOutput(storage.join(preprocess_dir, "transform_fn"))
    tree = CategoryTree.from_records(storage.read_json(storage.join(preprocess_dir, "categories.json")))
    vocab, attr_sizes, attr_vocab = vocabulary_sizes(cfg, tft_output)
    train_split = read_split(tft_output, preprocess_dir, "train")
    rule_targets = train_split.targets
    num_examples = int((rule_targets[:, : len(tree)].sum(axis=1) > 0).sum()) if m.train_only_labelled else len(rule_targets)
    null_count = round(m.null_evidence_share * num_examples)
    if null_count:
        train_split = with_examples(train_split, *null_evidence_examples(cfg, tft_output, len(tree), null_count, m.seed))
    train_ds = make_dataset(cfg, tft_output, train_split, m.batch_size, True, m.train_only_labelled)
    eval_ds = make_dataset(cfg, tft_output, read_split(tft_output, preprocess_dir, "eval"), m.batch_size, False, m.train_only_labelled)
    golden = golden_set(cfg, preprocess_dir, tree) if m.threshold_labels == "golden" else None
    model = build_model(cfg, len(tree), vocab, attr_sizes, tree.level_columns(tree.levels))
    model.summary(print_fn=log.info)
    started = time.perf_counter()
    history, fit_seconds = fit(model, train_ds, eval_ds, m.epochs, num_examples + null_count, "fit")
    serve = serving_function(model, tft_output, cfg)
    scorer = category_scorer(model)
    train_examples = (num_examples + null_count) * len(history["loss"])
    thresholds, eval_metrics = eval_thresholds(scorer, serve, cfg, eval_ds, golden, tree)
    rounds = []
    for round_no in range(1, m.self_training_rounds + 1):
        in_order = make_dataset(cfg, tft_output, train_split, SCORING_BATCH, False, False, with_extra=False)
        scores = score_examples(scorer, in_order)
        targets, added = pseudo_labels(scores, *np.split(rule_targets, 2, axis=1), tree, m.self_training_min_score)
        round_examples = int((targets[:, : len(tree)].sum(axis=1) > 0).sum()) if m.train_only_labelled else len(targets)
        round_ds = make_dataset(cfg, tft_output, train_split, m.batch_size, True, m.train_only_labelled, targets)
        round_history, round_seconds = fit(
            model,
            round_ds,
            eval_ds,
            m.self_training_epochs,
            round_examples + null_count,
            f"self-training round {round_no}/{m.self_training_rounds}",
        )
        fit_seconds += round_seconds
        train_examples += (round_examples + null_count) * len(round_history["loss"])
        before = finest_micro_f1(eval_metrics)
        thresholds, eval_metrics = eval_thresholds(scorer, serve, cfg, eval_ds, golden, tree)
        rounds.append(
            {
                "round": round_no,
                "pseudo_labelled": added,
                "eval_finest_micro_f1_before": before,
                "eval_finest_micro_f1_after": finest_micro_f1(eval_metrics),
                "epochs": len(round_history["loss"]),
            }
        )
        log.info(
            "self-training round %d: %d pseudo-labelled train products, eval finest-level micro-F1 %s -> %s",
            round_no,
            added,
            before,
            rounds[-1]["eval_finest_micro_f1_after"],
        )
    train_seconds = time.perf_counter() - started

    card = {
        "model_version": model_version,
        "run_id": run_id,
        "model": dataclasses.asdict(m),
        "config": dataclasses.asdict(cfg),
        "preprocess_dir": preprocess_dir,
        "categories": tree.to_records(),
        "thresholds": [round(float(t), 6) for t in thresholds],
        "thresholds_from": "golden set (ground truth of the eval split)" if golden is not None else "rule labels of the eval split",
        "eval_finest_micro_f1": finest_micro_f1(eval_metrics),
        "self_training": rounds,
        "attribute_vocabularies": attr_vocab,
        "history": history,
        # Examples fed through training steps over the wall-clock seconds of the model.fit calls
        # that fed them (steps, per-epoch validation, tracing, early stopping's weight copies);
        # self-training's scoring passes and thresholds are in train_seconds only.
        "train_examples": train_examples,
        "train_fit_seconds": round(fit_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "train_examples_per_s": train_examples / max(fit_seconds, 1e-9),
    }
    with storage.atomic_stage(out_dir) as tmp:
        export_model(model, serve, storage.join(tmp, serving.SAVED_MODEL))
        storage.write_json(storage.join(tmp, serving.MODEL_CARD), card)
    log.info("trained %s model %s: %d categories, %.0f examples/s", m.type, model_version, len(tree), card["train_examples_per_s"])
    return card
