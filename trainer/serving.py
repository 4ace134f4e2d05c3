"""The exported model's contract: raw inputs in, category scores and attribute probabilities out.

Evaluation and batch prediction both go through :class:`ServingModel`, so what is measured
is exactly what is served.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from pipelines import features, storage
from pipelines.config import CategoricalInput, DenseInput, FeatureConfig, ImageInput, TextInput
from pipelines.taxonomy import CategoryTree

SAVED_MODEL = "saved_model"
MODEL_CARD = "model_card.json"
EMBEDDING = "embedding"  # output: the k-NN space (trainer/fewshot.py), one L2-normalised row per product
METRIC_EMBEDDING = "metric_embedding"  # output: its learned part alone


def serving_input_specs(cfg: FeatureConfig) -> Dict[str, Any]:
    """Name -> ``tf.TensorSpec`` of every raw serving input."""
    import tensorflow as tf

    specs: Dict[str, Any] = {}
    for inp in cfg.inputs:
        if isinstance(inp, (TextInput, CategoricalInput)):
            specs[inp.source] = tf.TensorSpec([None], tf.string, name=inp.source)
        elif isinstance(inp, DenseInput):
            specs[inp.source] = tf.TensorSpec([None], tf.float32, name=inp.source)
        elif isinstance(inp, ImageInput):
            specs[inp.name] = tf.TensorSpec([None, inp.dim], tf.float32, name=inp.name)
            specs[features.HAS_IMAGE] = tf.TensorSpec([None], tf.int64, name=features.HAS_IMAGE)
    return specs


def raw_batch(cfg: FeatureConfig, rows: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
    """Clean rows (as in the preprocessing Parquet) -> the serving signature's inputs."""
    batch: Dict[str, np.ndarray] = {}
    for inp in cfg.inputs:
        if isinstance(inp, (TextInput, CategoricalInput)):
            batch[inp.source] = np.array([r.get(inp.source) or "" for r in rows], dtype=object)
        elif isinstance(inp, DenseInput):
            batch[inp.source] = np.array([float(r.get(inp.source) or inp.default) for r in rows], dtype=np.float32)
        elif isinstance(inp, ImageInput):
            zeros = np.zeros(inp.dim, dtype=np.float32)
            batch[inp.name] = (
                np.stack(
                    [np.asarray(r["image_embedding"], dtype=np.float32) if r.get("image_embedding") is not None else zeros for r in rows]
                )
                if rows
                else np.zeros((0, inp.dim), dtype=np.float32)
            )
            batch[features.HAS_IMAGE] = np.array([int(r.get("has_image") or 0) for r in rows], dtype=np.int64)
    return batch


@dataclasses.dataclass
class ServingModel:
    """A loaded model folder: the SavedModel plus its card (categories, thresholds, vocabularies)."""

    signature: Any
    card: dict
    tree: CategoryTree

    @classmethod
    def load(cls, model_dir: str) -> ServingModel:
        import tensorflow as tf

        card = storage.read_json(storage.join(model_dir, MODEL_CARD))
        loaded = tf.saved_model.load(storage.join(model_dir, SAVED_MODEL))
        model = cls(signature=loaded.signatures["serving_default"], card=card, tree=CategoryTree.from_records(card["categories"]))
        model._loaded = loaded  # keeps the resources the signature needs alive
        return model

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self.card["thresholds"], dtype=np.float32)

    def known_labels(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The rows' labels ``[N, C]`` closed under ancestors: human labels where a row has
        any (they beat rule labels), else its rule labels."""
        y = np.zeros((len(rows), len(self.tree)), dtype=bool)
        for i, row in enumerate(rows):
            labels = row.get(features.HUMAN_CATEGORIES) or row.get(features.RULE_CATEGORIES) or []
            for cid in self.tree.closure([c for c in labels if c in self.tree]):
                y[i, self.tree.index[cid]] = True
        return y

    def rule_labels(self, rows: Sequence[Mapping[str, Any]]) -> Optional[np.ndarray]:
        """The rows' known labels (:meth:`known_labels`) where the model keeps them in its
        decisions, else None."""
        return self.known_labels(rows) if self.card["model"].get("keep_rule_labels") else None

    def predict(self, raw: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import tensorflow as tf

        out = self.signature(**{k: tf.constant(v) for k, v in raw.items()})
        return {k: v.numpy() for k, v in out.items()}

    def attribute_values(self) -> Dict[str, List[str]]:
        return self.card["attribute_vocabularies"]
