"""The exported model's contract: raw inputs in, category scores and attribute probabilities out.

Evaluation and batch prediction both go through :class:`ServingModel`, so what is measured
is exactly what is served.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from core import inputs, storage
from core.config import FeatureConfig
from core.rows import HUMAN_CATEGORIES, RULE_CATEGORIES
from core.taxonomy import CategoryTree

SAVED_MODEL = "saved_model"
MODEL_CARD = "model_card.json"
EMBEDDING = "embedding"  # output: the k-NN space (trainer/fewshot.py), one L2-normalised row per product
METRIC_EMBEDDING = "metric_embedding"  # output: its learned part alone


def serving_input_specs(cfg: FeatureConfig) -> Dict[str, Any]:
    """Name -> ``tf.TensorSpec`` of every raw serving input."""
    return {name: feature.tensor_spec(name) for name, feature in inputs.raw_features(cfg).items()}


def raw_batch(cfg: FeatureConfig, rows: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
    """Clean rows (as in the preprocessing Parquet) -> the serving signature's inputs, each row
    through :func:`core.inputs.raw_inputs` as in the training examples."""
    per_row = [inputs.raw_inputs(cfg, row) for row in rows]
    return {
        name: np.array([values[name] for values in per_row], dtype=feature.numpy_dtype).reshape((len(rows), *feature.shape))
        for name, feature in inputs.raw_features(cfg).items()
    }


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
            labels = row.get(HUMAN_CATEGORIES) or row.get(RULE_CATEGORIES) or []
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
