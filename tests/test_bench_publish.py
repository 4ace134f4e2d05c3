"""The publish benchmark's medians over its rounds of consuming rows."""

import pytest

from benchmarks.publish import consuming_medians

pytestmark = pytest.mark.unit


def test_each_row_kind_gets_the_median_of_its_rounds_in_round_order():
    rows = [
        {"round": 1, "kind": "predictions", "consumers": 1, "indexed_docs_per_s": 900.0},
        {"round": 1, "kind": "predictions", "consumers": 2, "indexed_docs_per_s": 950.0},
        {"round": 2, "kind": "predictions", "consumers": 1, "indexed_docs_per_s": 1100.0},
        {"round": 2, "kind": "predictions", "consumers": 2, "indexed_docs_per_s": 940.0},
        {"round": 3, "kind": "predictions", "consumers": 1, "indexed_docs_per_s": 1000.0},
        {"round": 3, "kind": "predictions", "consumers": 2, "indexed_docs_per_s": 990.0},
    ]
    assert consuming_medians(rows) == [
        {"kind": "predictions", "consumers": 1, "median_docs_per_s": 1000.0, "rounds": [900.0, 1100.0, 1000.0]},
        {"kind": "predictions", "consumers": 2, "median_docs_per_s": 950.0, "rounds": [950.0, 940.0, 990.0]},
    ]
