"""Training: transformed examples -> fitted model -> per-category thresholds -> exported model folder.

The export is a SavedModel whose ``serving_default`` takes raw features (TFT's transform
graph inside) plus a model card holding the categories, thresholds and data run.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, Optional, Tuple

import numpy as np

from pipelines import features, storage
from pipelines.config import CategoricalInput, FeatureConfig
from pipelines.taxonomy import CategoryTree
from trainer import serving
from trainer.model import CATEGORIES, build_model

log = logging.getLogger(__name__)

SEED = 42


def transformed_files(preprocess_dir: str, split: str) -> list[str]:
    return storage.list_files(storage.join(preprocess_dir, "transformed"), f"{split}-*.tfrecord.gz")


def make_dataset(cfg: FeatureConfig, tft_output, files, batch_size: int, shuffle: bool, only_labelled: bool):
    """(features, labels) batches; the category target is ``[labels | mask]``."""
    import tensorflow as tf

    spec = tft_output.transformed_feature_spec()
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP")
    ds = ds.map(lambda x: tf.io.parse_single_example(x, spec), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if only_labelled:
        ds = ds.filter(lambda ex: tf.reduce_sum(ex[features.LABELS]) > 0)
    if shuffle:
        ds = ds.shuffle(20000, seed=SEED, reshuffle_each_iteration=True)

    def split_labels(ex):
        labels = {CATEGORIES: tf.concat([ex.pop(features.LABELS), ex.pop(features.LABEL_MASK)], axis=-1)}
        for attr in cfg.labels.attributes:
            labels[attr.name] = ex.pop(features.attribute_key(attr.name))
        return ex, labels

    return ds.batch(batch_size).map(split_labels).prefetch(tf.data.AUTOTUNE)


def choose_thresholds(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray, target_precision: float, min_threshold: float) -> np.ndarray:
    """Per category: the lowest threshold (>= ``min_threshold``) whose precision on the known
    eval labels reaches ``target_precision``; else the best-F1 one; 0.5 without positives."""
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
        ok = (s >= min_threshold) & (precision >= target_precision)
        if ok.any():
            thresholds[c] = s[np.flatnonzero(ok)[-1]]
        else:
            allowed = s >= min_threshold
            thresholds[c] = s[np.argmax(np.where(allowed, f1, -1))] if allowed.any() else 1.0
    return thresholds


def export_model(model, tft_output, cfg: FeatureConfig, export_dir: str) -> None:
    """Saves ``model`` behind a raw-input serving signature that applies the TFT graph."""
    import tensorflow as tf

    model.tft_layer = tft_output.transform_features_layer()
    specs = serving.serving_input_specs(cfg)
    model_input_names = set(model.input_names)

    @tf.function
    def serve(**raw):
        transformed = model.tft_layer(raw)
        outputs = model({k: v for k, v in transformed.items() if k in model_input_names}, training=False)
        return {
            "category_scores": outputs[CATEGORIES],
            **{f"{a.name}_probs": outputs[a.name] for a in cfg.labels.attributes},
        }

    # Keyword arguments give the signature its raw input names.
    signature = serve.get_concrete_function(**specs)
    tf.saved_model.save(model, export_dir, signatures={"serving_default": signature})


def vocabulary_sizes(cfg: FeatureConfig, tft_output) -> Tuple[Dict[str, int], Dict[str, int], Dict[str, list]]:
    vocab = {i.name: tft_output.vocabulary_size_by_name(i.name) for i in cfg.inputs if isinstance(i, CategoricalInput)}
    attr_vocab = {
        a.name: [v.decode() if isinstance(v, bytes) else v for v in tft_output.vocabulary_by_name(features.attribute_key(a.name))]
        for a in cfg.labels.attributes
    }
    return vocab, {k: max(len(v), 1) for k, v in attr_vocab.items()}, attr_vocab


def train(cfg: FeatureConfig, preprocess_dir: str, out_dir: str, model_version: str, run_id: str) -> dict:
    """Fits ``cfg.model``, sets thresholds on eval data, exports into ``out_dir``; returns the card."""
    import tensorflow as tf
    import tensorflow_transform as tft

    storage.require_complete(preprocess_dir)
    tf.keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    tft_output = tft.TFTransformOutput(storage.join(preprocess_dir, "transform_fn"))
    tree = CategoryTree.from_records(storage.read_json(storage.join(preprocess_dir, "categories.json")))
    vocab, attr_sizes, attr_vocab = vocabulary_sizes(cfg, tft_output)
    m = cfg.model
    train_ds = make_dataset(cfg, tft_output, transformed_files(preprocess_dir, "train"), m.batch_size, True, m.train_only_labelled)
    eval_ds = make_dataset(cfg, tft_output, transformed_files(preprocess_dir, "eval"), m.batch_size, False, m.train_only_labelled)
    model = build_model(cfg, len(tree), vocab, attr_sizes)
    started = time.perf_counter()
    history = model.fit(
        train_ds,
        validation_data=eval_ds,
        epochs=m.epochs,
        verbose=2,
        callbacks=[tf.keras.callbacks.EarlyStopping(monitor=f"val_{CATEGORIES}_loss", patience=2, restore_best_weights=True)],
    )
    train_seconds = time.perf_counter() - started
    train_examples = sum(int(tf.shape(y[CATEGORIES])[0]) for _, y in train_ds) * len(history.epoch)

    scores, labels, masks = [], [], []
    for x, y in eval_ds:
        scores.append(model(x, training=False)[CATEGORIES].numpy())
        lab, mask = np.split(y[CATEGORIES].numpy(), 2, axis=-1)
        labels.append(lab)
        masks.append(mask)
    if scores:
        thresholds = choose_thresholds(np.concatenate(scores), np.concatenate(labels), np.concatenate(masks), m.target_precision, m.min_threshold)
    else:
        thresholds = np.full(len(tree), 0.5, dtype=np.float32)

    card = {
        "model_version": model_version,
        "run_id": run_id,
        "model": dataclasses.asdict(m),
        "config": dataclasses.asdict(cfg),
        "preprocess_dir": preprocess_dir,
        "categories": tree.to_records(),
        "thresholds": [round(float(t), 6) for t in thresholds],
        "attribute_vocabularies": attr_vocab,
        "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
        "train_examples_per_s": train_examples / max(train_seconds, 1e-9),
    }
    with storage.atomic_stage(out_dir) as tmp:
        export_model(model, tft_output, cfg, storage.join(tmp, serving.SAVED_MODEL))
        storage.write_json(storage.join(tmp, serving.MODEL_CARD), card)
    log.info("trained %s model %s: %d categories, %.0f examples/s", m.type, model_version, len(tree), card["train_examples_per_s"])
    return card


def model_config(cfg: FeatureConfig, model_type: Optional[str]) -> FeatureConfig:
    return cfg if not model_type else cfg.replace_model(type=model_type)
