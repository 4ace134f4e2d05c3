"""Visual neighbours: ScaNN recall against exact search, the edge cases of a group, and the
composite transforms with TestPipeline."""

import dataclasses
import glob
import gzip
import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from core.config import LOCAL_BEAM_RUNNER, Neighbours
from core.taxonomy import CategoryTree
from pipelines.neighbours import (
    AssignGroup,
    GroupByCategory,
    SearchNeighbours,
    WriteNeighbours,
    choose_spill,
    exact_search,
    keyed_row,
    normalise,
    search_group,
)

pytestmark = pytest.mark.unit

SETTINGS = Neighbours()


def clustered(n, dim, clusters, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)


def exact_top_k(vectors, k):
    unit, _ = normalise(vectors)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_partitioned_path_recall_at_100_against_exact_search():
    vectors = clustered(6000, 64, 30)
    ids = [str(i) for i in range(len(vectors))]
    settings = dataclasses.replace(SETTINGS, brute_force_below=1000, query_chunk=1000)
    found = dict(search_group(ids, vectors, settings))
    truth = exact_top_k(vectors, 100)
    sample = range(0, len(ids), 10)
    recall = np.mean([len({int(n) for n, _ in found[str(i)]} & set(truth[i].tolist())) / 100 for i in sample])
    assert recall >= 0.95
    assert all(len(found[i]) == 100 and i not in {n for n, _ in found[i]} for i in ids)


def test_partitioned_path_with_every_query_sampled_for_recall_1_is_exact():
    vectors = clustered(2000, 32, 10, seed=3)
    ids = [str(i) for i in range(len(vectors))]
    settings = dataclasses.replace(SETTINGS, k=20, brute_force_below=100, leaf_size=200, target_recall=1.0, recall_queries=2000)
    found = dict(search_group(ids, vectors, settings))
    truth = exact_top_k(vectors, 20)
    same = np.mean([len({int(n) for n, _ in found[str(i)]} & set(truth[i].tolist())) / 20 for i in range(len(ids))])
    assert same >= 0.999  # float near-ties between numpy and ScaNN may swap the 20th and 21st


def test_spill_grows_with_the_target_recall_and_reaches_it_on_the_sample():
    unit, _ = normalise(clustered(3000, 32, 10, seed=4))
    centroids, _ = normalise(unit[:: 3000 // 15][:15])
    spills = {}
    for target in (0.5, 0.9, 1.0):
        settings = dataclasses.replace(SETTINGS, target_recall=target, recall_queries=300)
        spills[target], estimated = choose_spill(unit, centroids, 50, settings, seed=0)
        assert estimated >= target and 1 <= spills[target] <= 15
    assert spills[0.5] < spills[0.9] <= spills[1.0]


def test_exact_path_matches_numpy_and_orders_by_score():
    vectors = clustered(300, 16, 5, seed=1)
    ids = [f"p{i}" for i in range(300)]
    found = dict(search_group(ids, vectors, SETTINGS))
    truth = exact_top_k(vectors, 100)
    for i in range(0, 300, 37):
        assert [n for n, _ in found[ids[i]]] == [ids[j] for j in truth[i]]
        scores = [s for _, s in found[ids[i]]]
        assert scores == sorted(scores, reverse=True)


def test_exact_search_orders_ties_by_index():
    unit = np.asarray([[1, 0], [0, 1], [1, 0], [0.6, 0.8], [1, 0]], dtype=np.float32)
    found, scores = exact_search(unit, unit[:1], 4)
    assert found.tolist() == [[0, 2, 4, 3]]
    assert scores[0].tolist() == pytest.approx([1, 1, 1, 0.6])


@pytest.mark.parametrize("brute_force_below", [10_000, 100])
def test_serialised_group_searcher_answers_a_new_product(tmp_path, brute_force_below):
    from services.scann_search import scann_ops_pybind

    vectors = clustered(400, 16, 4, seed=2)
    ids = [f"p{i}" for i in range(400)]
    settings = dataclasses.replace(SETTINGS, brute_force_below=brute_force_below)
    found = dict(search_group(ids, vectors, settings, str(tmp_path)))
    for pid, pairs in found.items():
        names, scores = [n for n, _ in pairs], [s for _, s in pairs]
        assert pid not in names and len(set(names)) == len(names)
        assert np.isfinite(scores).all() and scores == sorted(scores, reverse=True)
    searcher = scann_ops_pybind.load_searcher(str(tmp_path))
    unit, _ = normalise(vectors)
    idx, _ = searcher.search_batched(unit, final_num_neighbors=settings.k + 1)
    exact = {ids[i]: [ids[j] for j in row if j != i][: settings.k] for i, row in enumerate(idx)}
    if brute_force_below > 400:  # exact in the pipeline: the loaded searcher gives the same order
        assert all(exact[pid] == [n for n, _ in pairs] for pid, pairs in found.items())
    else:  # partitioned in the pipeline: the loaded searcher is exact, the pipeline close to it
        overlap = np.mean([len(set(exact[pid]) & {n for n, _ in pairs}) / settings.k for pid, pairs in found.items()])
        assert overlap >= 0.95
    new_product = normalise(vectors[7:8] + 0.05)[0][0]
    idx, scores = searcher.search(new_product, final_num_neighbors=10)
    assert len(idx) > 0 and scores.tolist() == pytest.approx((unit[idx] @ new_product).tolist(), abs=1e-4)


def test_small_group_returns_what_it_has():
    found = dict(search_group(["a", "b", "c"], clustered(3, 8, 1), SETTINGS))
    assert {k: len(v) for k, v in found.items()} == {"a": 2, "b": 2, "c": 2}


def test_single_and_empty_groups():
    assert dict(search_group(["a"], clustered(1, 8, 1), SETTINGS)) == {"a": []}
    assert dict(search_group([], np.zeros((0, 8), np.float32), SETTINGS)) == {}


def test_zero_and_non_finite_vectors_are_nobodys_neighbour():
    vectors = clustered(5, 8, 1)
    vectors[1] = 0.0
    vectors[3] = np.nan
    found = dict(search_group(list("abcde"), vectors, SETTINGS))
    assert set(found) == {"a", "c", "e"}
    assert all({n for n, _ in v} <= {"a", "c", "e"} for v in found.values())


def test_duplicate_images_find_each_other_and_never_themselves():
    vectors = clustered(10, 8, 2)
    vectors[4] = vectors[7]
    found = dict(search_group([str(i) for i in range(10)], vectors, SETTINGS))
    assert found["4"][0] == ("7", pytest.approx(1.0, abs=1e-4))
    assert found["7"][0] == ("4", pytest.approx(1.0, abs=1e-4))
    assert all(pid not in {n for n, _ in v} for pid, v in found.items())


TREE = CategoryTree.from_paths([("A", "A1", "A1x"), ("A", "A2", "A2x")])


def prediction(pid, category):
    return pid, {"id": pid, "categories": [{"id": category, "level": 2, "score": 0.9}], "path": [category]}


def test_group_by_category_groups_embeddings_by_predicted_category_and_sets_aside_the_rest():
    def row(pid, embedding):
        return pid, {"id": pid, "has_image": int(embedding is not None), "image_embedding": embedding, "rule_categories": []}

    rows = [row("p1", [1.0, 0.0]), row("p2", [0.0, 1.0]), row("p3", None), row("p4", [1.0, 1.0]), row("p5", [0.5, 0.5])]
    predictions = [prediction("p1", "A > A1"), prediction("p2", "A > A1"), prediction("p3", "A > A1"), prediction("p5", "A > A2")]
    with test_pipeline.TestPipeline(runner=LOCAL_BEAM_RUNNER) as p:
        groups = {"rows": p | "Rows" >> beam.Create(rows), "predictions": p | "Predictions" >> beam.Create(predictions)} | GroupByCategory(
            TREE.to_records(), SETTINGS, "true_category"
        )
        assert_that(
            groups["grouped"] | beam.MapTuple(lambda group, members: (group, sorted(members))),
            equal_to([("A > A1", [("p1", [1.0, 0.0]), ("p2", [0.0, 1.0])]), ("A > A2", [("p5", [0.5, 0.5])])]),
            label="grouped",
        )
        assert_that(
            groups[AssignGroup.ALONE],
            equal_to([{"id": "p3", "group": "A > A1", "neighbours": []}, {"id": "p4", "group": None, "neighbours": []}]),
            label="alone",
        )


def test_keyed_row_carries_the_embedding_as_a_float32_array_and_a_missing_one_as_none():
    pid, row = keyed_row({"id": "p1", "has_image": 1, "image_embedding": [1.0, 0.5]})
    assert pid == "p1" and row["image_embedding"].dtype == np.float32 and row["image_embedding"].tolist() == [1.0, 0.5]
    assert keyed_row({"id": "p2", "has_image": 0, "image_embedding": None}) == ("p2", {"id": "p2", "has_image": 0, "image_embedding": None})


def test_search_neighbours_gives_each_usable_product_a_record_and_saves_each_group_searcher_with_its_ids(tmp_path):
    from services.scann_search import scann_ops_pybind

    members = [("c", [0.0, 1.0]), ("a", [1.0, 0.0]), ("b", [0.8, 0.6]), ("b0", [0.0, 0.0])]  # b0: no usable embedding
    alone = {"id": "z", "group": None, "neighbours": []}
    with test_pipeline.TestPipeline(runner=LOCAL_BEAM_RUNNER) as p:
        groups = {"grouped": p | "Grouped" >> beam.Create([("A > A1", members)]), AssignGroup.ALONE: p | "Alone" >> beam.Create([alone])}
        records = groups | SearchNeighbours(SETTINGS, str(tmp_path / "searchers"))
        assert_that(
            records,
            equal_to(
                [
                    {"id": "a", "group": "A > A1", "neighbours": [{"id": "b", "score": 0.8}, {"id": "c", "score": 0.0}]},
                    {"id": "b", "group": "A > A1", "neighbours": [{"id": "a", "score": 0.8}, {"id": "c", "score": 0.6}]},
                    {"id": "c", "group": "A > A1", "neighbours": [{"id": "b", "score": 0.6}, {"id": "a", "score": 0.0}]},
                    alone,
                ]
            ),
        )
    [saved] = (tmp_path / "searchers").iterdir()
    saved_ids = json.loads((saved / "group.json").read_text())
    assert saved_ids == {"group": "A > A1", "ids": ["a", "b", "c"]}
    found, _ = scann_ops_pybind.load_searcher(str(saved)).search(np.asarray([0.6, 0.8], np.float32), final_num_neighbors=2)
    assert [saved_ids["ids"][i] for i in found] == ["b", "c"]


def test_write_neighbours_writes_one_gzip_json_line_per_record(tmp_path):
    records = [{"id": "a", "group": "A > A1", "neighbours": [{"id": "b", "score": 0.8}]}, {"id": "z", "group": None, "neighbours": []}]
    with test_pipeline.TestPipeline(runner=LOCAL_BEAM_RUNNER) as p:
        _ = p | beam.Create(records) | WriteNeighbours(str(tmp_path / "neighbours"))
    lines = [line for path in glob.glob(str(tmp_path / "neighbours-*.jsonl.gz")) for line in gzip.open(path, "rt").read().splitlines()]
    assert sorted(lines) == [
        '{"group":"A > A1","id":"a","neighbours":[{"id":"b","score":0.8}]}',
        '{"group":null,"id":"z","neighbours":[]}',
    ]
