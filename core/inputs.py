"""The kinds of model input (text, categorical, image), each defined in one place.

A kind declares its raw features (the tf.Example and serving-signature inputs), maps a clean
row to their values, builds its TF Transform outputs and the Keras inputs that take them, and
names the clean-row columns and vocabulary it owns. Everything else dispatches on
``KINDS[inp.kind]``. TensorFlow is imported inside the methods that build graphs, so importing
this module (and ``core``) stays light.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from core.config import CategoricalInput, FeatureConfig, ImageInput, Input, TextInput

HAS_IMAGE = "has_image"

Vocabulary = Callable[[str], List[str]]  # a TFT vocabulary's values by its name


def ids_key(name: str) -> str:
    return f"{name}_ids"


def weights_key(name: str) -> str:
    return f"{name}_weights"


@dataclasses.dataclass(frozen=True)
class RawFeature:
    """One raw (pre-transform) feature: its dtype name and its shape per example."""

    dtype: str  # "string" | "float32" | "int64"
    shape: Tuple[int, ...] = ()

    @property
    def numpy_dtype(self) -> Any:
        return object if self.dtype == "string" else np.dtype(self.dtype)

    def feature_spec(self) -> Any:
        """The ``tf.io.FixedLenFeature`` that parses it from a tf.Example."""
        import tensorflow as tf

        return tf.io.FixedLenFeature(list(self.shape), tf.as_dtype(self.dtype))

    def tensor_spec(self, name: str) -> Any:
        """The serving signature's ``tf.TensorSpec`` of a batch of it."""
        import tensorflow as tf

        return tf.TensorSpec([None, *self.shape], tf.as_dtype(self.dtype), name=name)


class StringKind:
    """Shared by text and categorical inputs: one string column of the clean row, one vocabulary."""

    def raw_features(self, inp: Input) -> Dict[str, RawFeature]:
        return {inp.source: RawFeature("string")}

    def string_columns(self, inp: Input) -> Tuple[str, ...]:
        """The clean row's string columns the input reads (validated and stored by preprocessing)."""
        return (inp.source,)

    def vocabulary(self, inp: Input) -> Optional[str]:
        """The name of the TFT vocabulary the input's transform writes, if any."""
        return inp.name

    def left_out_when_zero(self, inp: Input) -> Tuple[str, ...]:
        """Transformed features that a record leaves out where all their values are zero."""
        return ()

    def raw_values(self, inp: Input, row: Mapping[str, Any]) -> Dict[str, Any]:
        return {inp.source: row.get(inp.source) or ""}


class TextKind(StringKind):
    """Cleaned text -> word or character n-grams -> top-k vocabulary -> TF-IDF (ids, weights)."""

    def transform(self, inp: TextInput, raw: Mapping[str, Any]) -> Dict[str, Any]:
        import tensorflow as tf
        import tensorflow_transform as tft

        from core import features

        text = tf.strings.substr(features.clean_text(raw[inp.source]), 0, inp.max_chars, unit="UTF8_CHAR")
        tokens = features.text_tokens(inp, text).to_sparse()
        ids = tft.compute_and_apply_vocabulary(tokens, top_k=inp.vocab_size, num_oov_buckets=inp.oov_buckets, vocab_filename=inp.name)
        tfidf_ids, tfidf_weights = tft.tfidf(ids, inp.vocab_size + inp.oov_buckets)
        return {ids_key(inp.name): tfidf_ids, weights_key(inp.name): tfidf_weights}

    def model_inputs(self, inp: TextInput) -> Dict[str, Any]:
        import tensorflow as tf

        return {
            ids_key(inp.name): tf.keras.Input(shape=(None,), sparse=True, dtype=tf.int64, name=ids_key(inp.name)),
            weights_key(inp.name): tf.keras.Input(shape=(None,), sparse=True, dtype=tf.float32, name=weights_key(inp.name)),
        }

    def unknown_values(self, inp: TextInput, count: int, rng: np.random.Generator, vocabulary: Vocabulary) -> Dict[str, Any]:
        """Raw values of ``count`` products the model knows nothing about: words in a script the
        catalogue does not use, so no token is in the vocabulary."""
        words = [["".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, size=3)) for _ in range(rng.integers(1, 5))] for _ in range(count)]
        return {inp.source: [" ".join(w) for w in words]}


class CategoricalKind(StringKind):
    """A lower-cased (or derived) value -> top-k vocabulary -> one id, for an embedding."""

    def transform(self, inp: CategoricalInput, raw: Mapping[str, Any]) -> Dict[str, Any]:
        import tensorflow as tf
        import tensorflow_transform as tft

        from core import features

        if inp.derive == "brand_from_title":
            values = features.brand_from_title(features.clean_text(raw[inp.source]))
        else:
            values = tf.strings.strip(tf.strings.lower(raw[inp.source], encoding="utf-8"))
        ids = tft.compute_and_apply_vocabulary(values, top_k=inp.top_k, num_oov_buckets=inp.oov_buckets, vocab_filename=inp.name)
        return {ids_key(inp.name): ids}

    def model_inputs(self, inp: CategoricalInput) -> Dict[str, Any]:
        import tensorflow as tf

        return {ids_key(inp.name): tf.keras.Input(shape=(), dtype=tf.int64, name=ids_key(inp.name))}

    def unknown_values(self, inp: CategoricalInput, count: int, rng: np.random.Generator, vocabulary: Vocabulary) -> Dict[str, Any]:
        """Each product a known value of the input or none."""
        values = [""] + vocabulary(inp.name)
        return {inp.source: [values[i] for i in rng.integers(0, len(values), size=count)]}


class ImageKind:
    """A precomputed image embedding (preprocessing's encoder) and whether the product has one."""

    def raw_features(self, inp: ImageInput) -> Dict[str, RawFeature]:
        return {inp.name: RawFeature("float32", (inp.dim,)), HAS_IMAGE: RawFeature("int64")}

    def string_columns(self, inp: ImageInput) -> Tuple[str, ...]:
        return ()

    def vocabulary(self, inp: ImageInput) -> Optional[str]:
        return None

    def left_out_when_zero(self, inp: ImageInput) -> Tuple[str, ...]:
        """The embedding, all zeros for a product without a photo."""
        return (inp.name,)

    def raw_values(self, inp: ImageInput, row: Mapping[str, Any]) -> Dict[str, Any]:
        embedding = row.get("image_embedding")
        return {
            inp.name: np.asarray(embedding if embedding is not None else np.zeros(inp.dim), dtype=np.float32),
            HAS_IMAGE: int(row.get("has_image") or 0),
        }

    def transform(self, inp: ImageInput, raw: Mapping[str, Any]) -> Dict[str, Any]:
        return {inp.name: raw[inp.name], HAS_IMAGE: raw[HAS_IMAGE]}

    def model_inputs(self, inp: ImageInput) -> Dict[str, Any]:
        import tensorflow as tf

        return {
            inp.name: tf.keras.Input(shape=(inp.dim,), dtype=tf.float32, name=inp.name),
            HAS_IMAGE: tf.keras.Input(shape=(), dtype=tf.int64, name=HAS_IMAGE),
        }

    def unknown_values(self, inp: ImageInput, count: int, rng: np.random.Generator, vocabulary: Vocabulary) -> Dict[str, Any]:
        """No image."""
        return {inp.name: np.zeros((count, inp.dim), dtype=np.float32), HAS_IMAGE: np.zeros(count, dtype=np.int64)}


KINDS = {"text": TextKind(), "categorical": CategoricalKind(), "image": ImageKind()}


def raw_features(cfg: FeatureConfig) -> Dict[str, RawFeature]:
    """Every raw model input of the config, by name: what training examples hold and the model serves on."""
    out: Dict[str, RawFeature] = {}
    for inp in cfg.inputs:
        out.update(KINDS[inp.kind].raw_features(inp))
    return out


def raw_inputs(cfg: FeatureConfig, row: Mapping[str, Any]) -> Dict[str, Any]:
    """One clean row -> its raw model inputs. The one mapping: preprocessing writes these into the
    training examples, serving batches them (``trainer.serving.raw_batch``), so the two cannot skew."""
    out: Dict[str, Any] = {}
    for inp in cfg.inputs:
        out.update(KINDS[inp.kind].raw_values(inp, row))
    return out


def left_out_when_zero(cfg: FeatureConfig) -> Tuple[str, ...]:
    """Transformed features that preprocessing leaves out of a record where all their values are
    zero: a product without a photo would otherwise carry a 5 KB embedding of zeros (79% of the
    catalogue's records). Readers parse them with zeros as the default."""
    return tuple(name for inp in cfg.inputs for name in KINDS[inp.kind].left_out_when_zero(inp))


def transformed_spec(cfg: FeatureConfig, spec: Mapping[str, Any]) -> Dict[str, Any]:
    """The spec to parse transformed records with: TF Transform's ``spec`` where each feature of
    :func:`left_out_when_zero` defaults to zeros."""
    import tensorflow as tf

    out = dict(spec)
    for key in left_out_when_zero(cfg):
        out[key] = tf.io.FixedLenFeature(
            spec[key].shape, spec[key].dtype, default_value=np.zeros(spec[key].shape, spec[key].dtype.as_numpy_dtype)
        )
    return out


def string_columns(cfg: FeatureConfig) -> List[str]:
    """The clean rows' string columns the inputs read, sorted."""
    return sorted({column for inp in cfg.inputs for column in KINDS[inp.kind].string_columns(inp)})
