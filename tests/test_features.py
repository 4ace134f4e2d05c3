"""The preprocessing_fn on a handful of in-memory rows with exact outputs (TFT example-test style)."""

import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from core import features
from core.config import parse_config

pytestmark = pytest.mark.unit

CONFIG = {
    "inputs": [
        {"name": "title", "kind": "text", "source": "title", "vocab_size": 3, "oov_buckets": 1},
        {"name": "brand", "kind": "categorical", "source": "title", "derive": "brand_from_title", "top_k": None, "oov_buckets": 1},
        {"name": "gender", "kind": "categorical", "source": "gender", "oov_buckets": 1},
    ],
    "labels": {
        "levels": 2,
        "rule_field": "rule_categories",
        "ground_truth_field": "true_category",
        "attributes": [{"name": "colour", "source": "base_colour"}],
    },
}


def run_transform(rows, cfg, num_categories=2):
    spec = features.raw_feature_spec(cfg, num_categories)
    metadata = dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(spec))
    with tft_beam.Context(temp_dir=tempfile.mkdtemp()):
        (out, _), _ = (rows, metadata) | tft_beam.AnalyzeAndTransformDataset(features.make_preprocessing_fn(cfg))
    return out


def row(title, gender, colour, labels=(1.0, 0.0)):
    return {"title": title, "gender": gender, "base_colour": [colour] if colour else [], "labels": list(labels), "label_mask": [1.0, 1.0]}


def test_preprocessing_fn_exact_outputs():
    cfg = parse_config(CONFIG)
    rows = [
        row("Puma Men Blue <b>T-shirt</b>", "Men", "Blue"),
        row("Puma Women Shoes > Sneakers", "Women", None),
        row("Nike Men Blue Shoes // Sneakers", "Men", "Black"),
    ]
    out = run_transform(rows, cfg)
    # Tokens with count 2: blue, men, puma, shoes, sneakers; top 3 ties break by token,
    # descending: sneakers=0, shoes=1, puma=2, OOV bucket=3. idf = 1 + ln((1 + 3) / (1 + df)).
    idf2 = 1 + np.log(4 / 3)
    expected = [
        ([2, 3], [idf2 / 5, 4 / 5]),  # puma | men blue t shirt (OOV)
        ([0, 1, 2, 3], [idf2 / 4, idf2 / 4, idf2 / 4, 1 / 4]),  # sneakers shoes puma | women
        ([0, 1, 3], [idf2 / 5, idf2 / 5, 3 / 5]),  # sneakers shoes | nike men blue
    ]
    for o, (ids, weights) in zip(out, expected):
        assert list(o["title_ids"]) == ids
        np.testing.assert_allclose(o["title_weights"], weights, rtol=1e-5)
    assert [int(o["gender_ids"]) for o in out] == [0, 1, 0]
    # brands: "puma" x2, "nike" x1 -> puma=0, nike=1
    assert [int(o["brand_ids"]) for o in out] == [0, 0, 1]
    # colour label: present values only; missing -> -1 (its loss is masked)
    assert [int(o["colour_label"]) for o in out] == [0, -1, 1]
    np.testing.assert_allclose(out[0]["labels"], [1.0, 0.0])


def test_tfidf_ids_are_in_range_each_with_a_positive_weight():
    cfg = parse_config(CONFIG)
    out = run_transform([row("red red shirt", "Men", "Red"), row("blue shirt", "Men", "Blue")], cfg)
    for o in out:
        assert all(0 <= i < 4 for i in o["title_ids"])
        assert len(o["title_ids"]) == len(o["title_weights"]) and all(w > 0 for w in o["title_weights"])


@pytest.mark.parametrize("raw", ["Shoes > Sneakers", "shoes // sneakers", "SHOES|Sneakers", "  <p>Shoes</p>   Sneakers &amp; "])
def test_clean_text_gives_the_same_tokens_for_retailer_delimiters(raw):
    assert tf.strings.split(features.clean_text(tf.constant(raw))).numpy().tolist() == [b"shoes", b"sneakers"]


@pytest.mark.parametrize(
    "title, brand",
    [
        ("Peter England Men Party Blue Jeans", b"peter england"),
        ("Titan Women Silver Watch", b"titan"),
        ("Manchester United Men Solid Black Track Pants", b"manchester united"),
        ("Lakme Absolute Lipstick", b"lakme"),
    ],
)
def test_brand_from_title(title, brand):
    assert features.brand_from_title(features.clean_text(tf.constant(title))).numpy() == brand


def text_only_config(**title):
    return parse_config({**CONFIG, "inputs": [{"name": "title", "kind": "text", "source": "title", "vocab_size": 10, **title}]})


def test_word_bigrams_exact_outputs():
    out = run_transform([row("Red Tee", "Men", None), row("red tee top", "Men", None)], text_only_config(ngram_range=[1, 2]))
    # Counts: red 2, tee 2, "red tee" 2, top 1, "tee top" 1; ties by token, descending:
    # tee=0, "red tee"=1, red=2, top=3, "tee top"=4. idf = 1 + ln((1 + 2) / (1 + df)).
    idf1 = 1 + np.log(3 / 2)
    assert list(out[0]["title_ids"]) == [0, 1, 2]
    np.testing.assert_allclose(out[0]["title_weights"], [1 / 3] * 3, rtol=1e-5)
    assert list(out[1]["title_ids"]) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(out[1]["title_weights"], [1 / 5, 1 / 5, 1 / 5, idf1 / 5, idf1 / 5], rtol=1e-5)


def test_char_ngrams_exact_outputs():
    out = run_transform([row("Tee", "Men", None), row("tees!", "Men", None)], text_only_config(tokens="char_ngrams", ngram_range=[3, 3]))
    # Words padded with spaces: " te", "tee", "ee " | " te", "tee", "ees", "es ". Counts 2: "tee"=0, " te"=1;
    # counts 1, by token descending: "es "=2, "ees"=3, "ee "=4.
    idf1 = 1 + np.log(3 / 2)
    assert list(out[0]["title_ids"]) == [0, 1, 4]
    np.testing.assert_allclose(out[0]["title_weights"], [1 / 3, 1 / 3, idf1 / 3], rtol=1e-5)
    assert list(out[1]["title_ids"]) == [0, 1, 2, 3]
    np.testing.assert_allclose(out[1]["title_weights"], [1 / 4, 1 / 4, idf1 / 4, idf1 / 4], rtol=1e-5)


def test_char_ngrams_stay_within_words():
    grams = features.char_ngrams(tf.constant(["ab cd", ""]), (3, 4)).to_list()
    assert grams == [[b" ab", b"ab ", b" cd", b"cd ", b" ab ", b" cd "], []]
