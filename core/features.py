"""Feature names, raw schemas and the TF Transform ``preprocessing_fn``, all from the config.

Cleaning runs inside the TensorFlow graph, so the exported model applies exactly the
same text cleaning and brand extraction to raw serving inputs as training did.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import tensorflow as tf
import tensorflow_transform as tft

from core import inputs
from core.config import FeatureConfig, TextInput

LABELS = "labels"
LABEL_MASK = "label_mask"
GENDER_WORDS = r"(men|women|boys|girls|unisex|kids|man|woman)"


def attribute_key(name: str) -> str:
    return f"{name}_label"


def clean_text(text: tf.Tensor) -> tf.Tensor:
    """Lower case, markup and entities removed, any run of non letters/digits to one space.

    Retailer delimiters ("Shoes > Sneakers", "Shoes // Sneakers", "Shoes|Sneakers") thus
    give the same tokens.
    """
    text = tf.strings.lower(text, encoding="utf-8")
    text = tf.strings.regex_replace(text, r"<[^>]*>", " ")
    text = tf.strings.regex_replace(text, r"&[a-z]+;|&#[0-9]+;", " ")
    text = tf.strings.regex_replace(text, r"[^\p{L}\p{N}]+", " ")
    return tf.strings.strip(text)


def brand_from_title(cleaned_title: tf.Tensor) -> tf.Tensor:
    """The words before the first gender word ("peter england men party jeans" -> "peter england");
    the first word where the title has no gender word."""
    has_gender = tf.strings.regex_full_match(cleaned_title, rf"(.*\s)?{GENDER_WORDS}(\s.*)?")
    before_gender = tf.strings.strip(tf.strings.regex_replace(cleaned_title, rf"(^|\s){GENDER_WORDS}(\s.*)?$", ""))
    first_word = tf.strings.regex_replace(cleaned_title, r"^(\S*).*$", r"\1")
    return tf.where(has_gender, before_gender, first_word)


def word_ngrams(text: tf.Tensor, ngram_range: Tuple[int, int]) -> tf.RaggedTensor:
    """Space-joined word n-grams of each cleaned text, shortest first
    ("red tee", (1, 2) -> ["red", "tee", "red tee"])."""
    words = tf.strings.split(text)
    return tf.concat([tf.strings.ngrams(words, n, separator=" ") for n in range(ngram_range[0], ngram_range[1] + 1)], axis=1)


def char_ngrams(text: tf.Tensor, ngram_range: Tuple[int, int]) -> tf.RaggedTensor:
    """Character n-grams inside each word padded with a space on both sides, so misspelt and
    unseen words still share pieces with known ones ("tee", (3, 3) -> [" te", "tee", "ee "])."""
    words = tf.strings.split(text)
    padded = tf.ragged.map_flat_values(lambda w: tf.strings.join([" ", w, " "]), words)
    chars = tf.strings.unicode_split(padded, "UTF-8")
    grams = [tf.strings.ngrams(chars, n, separator="").merge_dims(1, 2) for n in range(ngram_range[0], ngram_range[1] + 1)]
    return tf.concat(grams, axis=1)


def text_tokens(inp: TextInput, cleaned: tf.Tensor) -> tf.RaggedTensor:
    """The tokens a text input's vocabulary counts: word or character n-grams (``inp.tokens``)."""
    lengths = (inp.ngram_range[0], inp.ngram_range[1])
    return char_ngrams(cleaned, lengths) if inp.tokens == "char_ngrams" else word_ngrams(cleaned, lengths)


def raw_feature_spec(cfg: FeatureConfig, num_categories: int, with_labels: bool = True) -> Dict[str, tf.io.FixedLenFeature]:
    """The raw (pre-transform) features; without labels it is the serving input."""
    spec: Dict[str, object] = {name: feature.feature_spec() for name, feature in inputs.raw_features(cfg).items()}
    if with_labels:
        spec[LABELS] = tf.io.FixedLenFeature([num_categories], tf.float32)
        spec[LABEL_MASK] = tf.io.FixedLenFeature([num_categories], tf.float32)
        for attr in cfg.labels.attributes:
            spec[attr.source] = tf.io.VarLenFeature(tf.string)
    return spec


def make_preprocessing_fn(cfg: FeatureConfig) -> Callable[[Dict[str, tf.Tensor]], Dict[str, tf.Tensor]]:
    """The ``preprocessing_fn`` for TF Transform: each input's kind transforms it, then the labels."""

    def preprocessing_fn(raw: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        out: Dict[str, tf.Tensor] = {}
        for inp in cfg.inputs:
            out.update(inputs.KINDS[inp.kind].transform(inp, raw))
        if LABELS in raw:
            out[LABELS] = raw[LABELS]
            out[LABEL_MASK] = raw[LABEL_MASK]
        for attr in cfg.labels.attributes:
            if attr.source not in raw:
                continue
            values = raw[attr.source]
            ids = tft.compute_and_apply_vocabulary(
                tf.SparseTensor(values.indices, tf.strings.lower(values.values), values.dense_shape),
                top_k=attr.top_k,
                default_value=-1,
                vocab_filename=attribute_key(attr.name),
            )
            dense = tf.sparse.to_dense(ids, default_value=-1)
            missing = -tf.ones([tf.shape(dense)[0], 1], dtype=dense.dtype)
            out[attribute_key(attr.name)] = tf.concat([dense, missing], axis=1)[:, 0]
        return out

    return preprocessing_fn
