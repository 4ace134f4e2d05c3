"""Top-k visual neighbours of each product within its second-level category (ScaNN, cosine).

A Beam pipeline joins the clean rows (embeddings) with each product's group (its predicted,
rule or true category at ``group_level``) and groups by category (``GroupByCategory``), searches
each group (``SearchNeighbours``, which also saves the group's searcher) and writes the records
(``WriteNeighbours``). A group is searched exactly (numpy matrix products) below
``brute_force_below`` products, with ScaNN partitioned + quantised + reordered above it, queries
in chunks. Products without a usable embedding get no neighbours and are never anyone's neighbour.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from core import storage
from core.config import Neighbours
from core.features import RULE_CATEGORIES
from core.taxonomy import CategoryTree
from pipelines.preprocess import beam_counters

log = logging.getLogger(__name__)

NAMESPACE = "prodcat.neighbours"
# cap on one exact-search block of similarities (float32 elements): 64M = 256 MB
EXACT_BLOCK_ELEMENTS = 64 * 2**20

Query = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]


def normalise(vectors: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Unit rows and a mask of rows that could be normalised (finite, non-zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    ok = np.isfinite(norms) & (norms > 1e-12)
    out = np.zeros_like(vectors)
    out[ok] = vectors[ok] / norms[ok, None]
    return out, ok


def build_searcher(vectors: np.ndarray, k: int, settings: Neighbours) -> Any:
    """A ScaNN searcher over unit ``vectors`` (dot product = cosine), settings from the group size."""
    from services.scann_search import scann_ops_pybind

    n = len(vectors)
    builder = scann_ops_pybind.builder(vectors, k, "dot_product")
    if n < settings.brute_force_below:
        return builder.score_brute_force().build()
    leaves = max(2, int(round(math.sqrt(n) * settings.leaves_per_sqrt_n)))
    to_search = max(1, int(math.ceil(leaves * settings.leaves_to_search_fraction)))
    return (
        builder.tree(num_leaves=leaves, num_leaves_to_search=to_search, training_sample_size=min(n, 250_000))
        .score_ah(2, anisotropic_quantization_threshold=0.2)
        .reorder(max(settings.reorder_k, k))
        .build()
    )


def exact_search(unit: np.ndarray, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``unit`` for each query by dot product: (indices, scores), best first,
    ties by index; blocks of queries keep the similarity matrix under ``EXACT_BLOCK_ELEMENTS``."""
    k = min(k, len(unit))
    block = max(1, EXACT_BLOCK_ELEMENTS // len(unit))
    found, scores = [], []
    for start in range(0, len(queries), block):
        sims = queries[start : start + block] @ unit.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(sims, top, axis=1)
        order = np.lexsort((top, -top_scores), axis=1)
        found.append(np.take_along_axis(top, order, axis=1))
        scores.append(np.take_along_axis(top_scores, order, axis=1))
    return np.concatenate(found), np.concatenate(scores)


def group_query(unit: np.ndarray, k: int, settings: Neighbours, keep_searcher: bool = False) -> Tuple[Query, Optional[Any]]:
    """A batch query over a group's unit vectors and, where built, its ScaNN searcher.

    Below ``brute_force_below`` the query is exact numpy search: on 2 cores it beat both ScaNN's
    brute force and its tree up to about 40k vectors of 1280 dimensions (benchmarks/results).
    ``keep_searcher`` builds a ScaNN searcher there too, to serialise for single new queries.
    """
    exact = len(unit) < settings.brute_force_below
    searcher = build_searcher(unit, k, settings) if keep_searcher or not exact else None
    if exact:
        return (lambda queries: exact_search(unit, queries, k)), searcher
    return (lambda queries: searcher.search_batched(queries, final_num_neighbors=k)), searcher


def search_group(
    ids: Sequence[str], vectors: np.ndarray, settings: Neighbours, searcher_dir: Optional[str] = None
) -> Iterator[Tuple[str, List[Tuple[str, float]]]]:
    """Each product's top-k neighbours (itself excluded) among ``ids``; chunked queries."""
    unit, ok = normalise(vectors)
    keep = np.flatnonzero(ok)
    ids = [ids[i] for i in keep]
    unit = unit[keep]
    if len(ids) < 2:
        for pid in ids:
            yield pid, []
        return
    k = min(settings.k, len(ids) - 1)
    query, searcher = group_query(unit, k + 1, settings, keep_searcher=searcher_dir is not None)
    if searcher_dir is not None:
        searcher.serialize(searcher_dir, relative_path=True)  # loadable wherever the folder is copied
    for start in range(0, len(ids), settings.query_chunk):
        found, scores = query(unit[start : start + settings.query_chunk])
        for row, (idx, sc) in enumerate(zip(found, scores)):
            me = start + row
            # ScaNN pads a row with index 0 and a NaN score when its searched leaves held fewer than k
            pairs = [(ids[j], round(float(s), 5)) for j, s in zip(idx, sc) if int(j) != me and np.isfinite(s)][:k]
            yield ids[me], pairs


def group_of(prediction: Optional[dict], row: dict, tree: CategoryTree, settings: Neighbours, ground_truth_field: str) -> Optional[str]:
    """The category at ``group_level`` a product is grouped by, per ``settings.group_by``."""
    level = settings.group_level
    candidates: List[str] = []
    if settings.group_by == "predicted" and prediction is not None:
        entries = sorted(prediction["categories"], key=lambda e: -e["score"])
        candidates = [e["id"] for e in entries if e["level"] == level] + tree.at_level(prediction.get("path", []), level)
    if not candidates and settings.group_by in ("predicted", "rule"):
        candidates = tree.at_level(row.get(RULE_CATEGORIES) or [], level)
    if not candidates and settings.group_by == "ground_truth":
        truth = row.get(ground_truth_field)
        if truth in tree:
            candidates = tree.at_level(tree.closure([truth]), level)
    return candidates[0] if candidates else None


class AssignGroup(beam.DoFn):
    """(id, {rows, predictions}) -> (group, (id, embedding)), or an empty neighbour record
    (``alone`` output) for a product without a usable embedding or group."""

    ALONE = "alone"

    def __init__(self, tree_records: List[dict], settings: Neighbours, ground_truth_field: str):
        self._tree_records = tree_records
        self._settings = settings
        self._truth = ground_truth_field

    def setup(self) -> None:
        self._tree = CategoryTree.from_records(self._tree_records)

    def process(self, element: Tuple[str, Dict[str, list]]) -> Iterator[Tuple[str, Tuple[str, list]]]:
        pid, joined = element
        if not joined["rows"]:
            return
        row = joined["rows"][0]
        group = group_of(joined["predictions"][0] if joined["predictions"] else None, row, self._tree, self._settings, self._truth)
        if not row.get("has_image") or row.get("image_embedding") is None or group is None:
            Metrics.counter(NAMESPACE, "no_neighbours_no_embedding" if group else "no_neighbours_no_group").inc()
            yield beam.pvalue.TaggedOutput(self.ALONE, {"id": pid, "group": group, "neighbours": []})
            return
        yield group, (pid, row["image_embedding"])


class SearchGroup(beam.DoFn):
    """(group, [(id, embedding)]) -> neighbour records; with ``searchers_dir``, the group's ScaNN
    searcher and its ids go to ``<searchers_dir>/<hash of the group>/`` (local or ``gs://``)."""

    def __init__(self, settings: Neighbours, searchers_dir: Optional[str]):
        self._settings = settings
        self._searchers_dir = searchers_dir
        self._groups_done = 0
        self._products_done = 0

    def process(self, element: Tuple[str, Iterable[Tuple[str, list]]]) -> Iterator[dict]:
        group, members = element
        members = sorted(members)
        ids = [m[0] for m in members]
        vectors = np.asarray([m[1] for m in members], dtype=np.float32)
        Metrics.counter(NAMESPACE, "groups").inc()
        started = time.monotonic()
        # ScaNN serialises to a local folder only: it is built in a temporary one, then copied.
        with tempfile.TemporaryDirectory() as local:
            searcher_dir = local if self._searchers_dir is not None else None
            for pid, pairs in search_group(ids, vectors, self._settings, searcher_dir):
                Metrics.counter(NAMESPACE, "products_with_neighbours").inc()
                yield {"id": pid, "group": group, "neighbours": [{"id": n, "score": s} for n, s in pairs]}
            if self._searchers_dir is not None:
                target = storage.join(self._searchers_dir, hashlib.sha256(group.encode()).hexdigest()[:16])
                storage.copy_local_tree(local, target)
                indexed = [pid for pid, usable in zip(ids, normalise(vectors)[1]) if usable]  # the searcher's rows
                storage.write_json(storage.join(target, "group.json"), {"group": group, "ids": indexed})
        self._groups_done += 1
        self._products_done += len(ids)
        # one line a group: a few dozen second-level categories in a catalogue
        log.info(
            "neighbours: %d groups done (%d products); %r: %d products in %.1f s",
            self._groups_done,
            self._products_done,
            group,
            len(ids),
            time.monotonic() - started,
        )


class ReadKeyedPredictions(beam.PTransform):
    """A finished predictions stage -> (id, prediction); nothing when ``predict_dir`` is None."""

    def __init__(self, predict_dir: Optional[str]):
        super().__init__()
        self._predict_dir = predict_dir

    def expand(self, begin: beam.pvalue.PBegin) -> beam.PCollection:
        if self._predict_dir is None:
            return begin | "NoPredictions" >> beam.Create([])
        from trainer.predict import PREDICTIONS_FILE

        storage.require_complete(self._predict_dir)
        return (
            begin
            | "Read" >> beam.io.ReadFromText(storage.join(self._predict_dir, PREDICTIONS_FILE))
            | "Parse" >> beam.Map(json.loads)
            | "KeyById" >> beam.Map(lambda r: (r["id"], r))
        )


class GroupByCategory(beam.PTransform):
    """``{"rows": (id, clean row), "predictions": (id, prediction)}`` -> ``{"grouped": (category at
    group_level, [(id, embedding)]), "alone": empty neighbour records}``; alone are the products
    without a usable embedding or a category."""

    def __init__(self, tree_records: List[dict], settings: Neighbours, ground_truth_field: str):
        super().__init__()
        self._assign = AssignGroup(tree_records, settings, ground_truth_field)

    def expand(self, joined: Dict[str, beam.PCollection]) -> Dict[str, beam.PCollection]:
        assigned = (
            joined
            | "JoinById" >> beam.CoGroupByKey()
            | "AssignGroups" >> beam.ParDo(self._assign).with_outputs(AssignGroup.ALONE, main="grouped")
        )
        return {"grouped": assigned.grouped | "GroupMembers" >> beam.GroupByKey(), AssignGroup.ALONE: assigned[AssignGroup.ALONE]}


class SearchNeighbours(beam.PTransform):
    """:class:`GroupByCategory`'s output -> one neighbour record per product (``{"id", "group",
    "neighbours"}``), the alone ones with none; searchers saved under ``searchers_dir``."""

    def __init__(self, settings: Neighbours, searchers_dir: Optional[str]):
        super().__init__()
        self._settings = settings
        self._searchers_dir = searchers_dir

    def expand(self, groups: Dict[str, beam.PCollection]) -> beam.PCollection:
        searched = groups["grouped"] | "SearchGroups" >> beam.ParDo(SearchGroup(self._settings, self._searchers_dir))
        return (searched, groups[AssignGroup.ALONE]) | "MergeNeighbourRecords" >> beam.Flatten()


class WriteNeighbours(beam.PTransform):
    """Neighbour records -> gzip JSON lines ``<prefix>-*.jsonl.gz``."""

    def __init__(self, prefix: str):
        super().__init__()
        self._prefix = prefix

    def expand(self, records: beam.PCollection) -> beam.PCollection:
        return (
            records
            | "Encode" >> beam.Map(lambda r: json.dumps(r, sort_keys=True))
            | "Write" >> beam.io.WriteToText(self._prefix, ".jsonl.gz")
        )


def compute_neighbours(
    settings: Neighbours,
    ground_truth_field: str,
    preprocess_dir: str,
    predict_dir: Optional[str],
    out_dir: str,
    beam_args: Optional[Sequence[str]] = None,
) -> dict:
    """Runs the neighbours pipeline; writes ``neighbours-*.jsonl.gz`` and per-group searchers."""
    storage.require_complete(preprocess_dir)
    tree = CategoryTree.from_records(storage.read_json(storage.join(preprocess_dir, "categories.json")))
    columns = ["id", "has_image", "image_embedding", RULE_CATEGORIES, ground_truth_field]
    with storage.atomic_stage(out_dir) as tmp:
        with beam.Pipeline(options=PipelineOptions(list(beam_args or []))) as p:
            rows = (
                p
                | "ReadCleanRows" >> beam.io.ReadFromParquet(storage.join(preprocess_dir, "clean", "*.parquet"), columns=columns)
                | "KeyRowsById" >> beam.Map(lambda r: (r["id"], r))
            )
            predictions = p | "ReadPredictions" >> ReadKeyedPredictions(predict_dir)
            groups = {"rows": rows, "predictions": predictions} | "GroupByCategory" >> GroupByCategory(
                tree.to_records(), settings, ground_truth_field
            )
            records = groups | "SearchNeighbours" >> SearchNeighbours(settings, storage.join(tmp, "searchers"))
            _ = records | "WriteNeighbours" >> WriteNeighbours(storage.join(tmp, "neighbours"))
        summary = {
            "counters": beam_counters(p.result, NAMESPACE),
            "k": settings.k,
            "group_level": settings.group_level,
            "preprocess_dir": preprocess_dir,
            "predict_dir": predict_dir,
        }
        storage.write_json(storage.join(tmp, "summary.json"), summary)
    log.info("neighbours: %s", summary)
    return summary


def read_neighbours(neighbours_dir: str) -> Iterator[dict]:
    return storage.read_json_lines(neighbours_dir, "neighbours-*.jsonl.gz")
