"""Statistics and anomalies: thresholds against the previous good run, fail or warn as configured."""

import dataclasses

import pytest

from core.config import Validation
from pipelines.statistics import find_anomalies

pytestmark = pytest.mark.unit

LIMITS = Validation(min_rows=10, max_missing_rate={"image": 0.9})


def stats(rows=1000, title_missing=0.0, image_missing=0.5, vocab=5000, labelled=0.6):
    return {
        "rows": rows,
        "features": {"title": {"missing_rate": title_missing, "vocabulary_size": vocab}, "image": {"missing_rate": image_missing}},
        "labels": {"labelled_rate": labelled},
    }


def test_same_data_has_no_anomalies():
    assert find_anomalies(stats(), stats(), LIMITS) == []


@pytest.mark.parametrize(
    "current, expected",
    [
        (stats(title_missing=0.3), "title: missing rate rose from 0.0% to 30.0%"),
        (stats(title_missing=0.6), "title: missing in 60.0% of products"),
        (stats(vocab=1000), "title: vocabulary size changed from 5000 to 1000"),
        (stats(rows=200), "rows: 1000 -> 200 products"),
        (stats(labelled=0.2), "labels: labelled share fell from 60.0% to 20.0%"),
        (stats(image_missing=0.95), "image: missing in 95.0% of products"),
    ],
)
def test_each_broken_threshold_is_named(current, expected):
    assert expected in find_anomalies(current, stats(), LIMITS)


def test_per_feature_limit_overrides_the_default():
    assert find_anomalies(stats(image_missing=0.85), None, LIMITS) == []
    assert find_anomalies(stats(image_missing=0.85), None, dataclasses.replace(LIMITS, max_missing_rate={})) == [
        "image: missing in 85.0% of products"
    ]


def test_first_run_is_only_checked_against_absolute_limits():
    assert find_anomalies(stats(rows=5), None, LIMITS) == ["rows: 5 products, fewer than 10"]
