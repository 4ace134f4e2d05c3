"""Top-k visual neighbours of each product within its second-level category (ScaNN, cosine).

A Beam pipeline joins the clean rows (embeddings) with each product's group (its predicted,
rule or true category at ``group_level``) and groups by category (``GroupByCategory``), searches
each group (``SearchNeighbours``, which also saves the group's searcher) and writes the records
(``WriteNeighbours``). A group is searched exactly (ScaNN brute force) below ``brute_force_below``
products; above it, k-means leaves are searched one at a time, each leaf's products together among
the products put into that leaf (``partitioned_blocks``). Products without a usable embedding get
no neighbours and are never anyone's neighbour.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import orjson
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from core import storage
from core.config import LOCAL_BEAM_RUNNER, Neighbours
from core.rows import RULE_CATEGORIES
from core.taxonomy import CategoryTree
from pipelines.counters import beam_counters

log = logging.getLogger(__name__)

NAMESPACE = "prodcat.neighbours"
# cap on one exact-search block of similarities (float32 elements): 64M = 256 MB
EXACT_BLOCK_ELEMENTS = 64 * 2**20


def normalise(vectors: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Unit rows and a mask of rows that could be normalised (finite, non-zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    ok = np.isfinite(norms) & (norms > 1e-12)
    out = np.zeros_like(vectors)
    out[ok] = vectors[ok] / norms[ok, None]
    return out, ok


def brute_force_searcher(unit: np.ndarray, k: int) -> Any:
    """A ScaNN brute-force searcher over the unit rows ``unit`` (dot product = cosine): exact answers, for
    the group's own queries below ``brute_force_below`` and, serialised, for single new products."""
    from services.scann_search import scann_ops_pybind

    return scann_ops_pybind.builder(unit, k, "dot_product").score_brute_force().build()


def exact_search(unit: np.ndarray, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``unit`` for each query by dot product: (indices, scores), best first,
    ties by index; blocks of queries keep the similarity matrix under ``EXACT_BLOCK_ELEMENTS``.
    Used for the few sampled queries that choose a partitioned search's spill."""
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


Block = Tuple[np.ndarray, np.ndarray, np.ndarray]  # query rows, their neighbours' rows, scores


def exact_blocks(searcher: Any, unit: np.ndarray, k: int, chunk: int) -> Iterator[Block]:
    """Every row's exact top-``k`` (itself included) from a brute-force ``searcher``, ``chunk`` rows at a time."""
    for start in range(0, len(unit), chunk):
        rows = np.arange(start, min(len(unit), start + chunk))
        found, scores = searcher.search_batched_parallel(unit[rows], final_num_neighbors=k)
        yield rows, found.astype(np.int64), scores


def leaf_similarities(unit: np.ndarray, centroids: np.ndarray, spill: int) -> Tuple[np.ndarray, np.ndarray]:
    """Each row's nearest leaf and its ``spill`` nearest leaves (any order), in chunks."""
    n, leaves = len(unit), len(centroids)
    primary = np.empty(n, dtype=np.int64)
    spilled = np.empty((n, spill), dtype=np.int64)
    for start in range(0, n, 65536):
        sims = unit[start : start + 65536] @ centroids.T
        primary[start : start + 65536] = np.argmax(sims, axis=1)
        spilled[start : start + 65536] = np.argpartition(-sims, spill - 1, axis=1)[:, :spill] if spill < leaves else np.arange(leaves)
    return primary, spilled


def choose_spill(unit: np.ndarray, centroids: np.ndarray, k: int, settings: Neighbours, seed: int) -> Tuple[int, float]:
    """The fewest leaves each row must be put into so that, on ``recall_queries`` sampled rows, the
    share of exact top-``k`` neighbours found in the query's own leaf reaches ``target_recall``.

    A query searches the rows put into its nearest leaf, so its true neighbour ``y`` is found when
    that leaf is among ``y``'s ``spill`` nearest leaves: the spill is a quantile of that leaf's rank."""
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(unit), size=min(len(unit), settings.recall_queries), replace=False)
    truth, _ = exact_search(unit, unit[sample], k)
    query_leaf = np.argmax(unit[sample] @ centroids.T, axis=1)
    neighbour_sims = unit[truth.ravel()] @ centroids.T
    own = neighbour_sims[np.arange(len(neighbour_sims)), np.repeat(query_leaf, truth.shape[1])]
    ranks = np.sort((neighbour_sims > own[:, None]).sum(axis=1))
    spill = int(ranks[max(0, math.ceil(settings.target_recall * len(ranks)) - 1)]) + 1
    return spill, float(np.mean(ranks < spill))


def partitioned_blocks(unit: np.ndarray, k: int, settings: Neighbours, seed: int = 0) -> Iterator[Block]:
    """Every row's approximate top-``k`` (itself included), one leaf at a time.

    k-means splits the group into leaves of about ``leaf_size`` rows; each row is also put into its
    next nearest leaves (the spill, chosen for ``target_recall``). The rows whose nearest leaf is
    ``l`` are searched together, exactly, among the rows put into ``l``: one many-to-many ScaNN
    brute-force search per leaf, not one scan of memory per query."""
    from sklearn.cluster import KMeans

    n = len(unit)
    leaves = max(2, int(round(n / settings.leaf_size)))
    rng = np.random.default_rng(seed)
    train = unit[np.sort(rng.choice(n, size=min(n, max(20_000, 20 * leaves)), replace=False))]
    kmeans = KMeans(leaves, init="random", n_init=1, max_iter=20, random_state=seed).fit(train)
    centroids, _ = normalise(kmeans.cluster_centers_)
    spill, estimated = choose_spill(unit, centroids, k, settings, seed)
    log.info("neighbours: %d products in %d leaves, each put into %d (estimated recall %.3f)", n, leaves, spill, estimated)
    primary, spilled = leaf_similarities(unit, centroids, spill)
    members = np.argsort(spilled.ravel(), kind="stable")
    member_rows = members // spill
    member_bounds = np.searchsorted(spilled.ravel()[members], np.arange(leaves + 1))
    queries = np.argsort(primary, kind="stable")
    query_bounds = np.searchsorted(primary[queries], np.arange(leaves + 1))
    report_every = max(1, leaves // 10)
    for leaf in range(leaves):
        rows = queries[query_bounds[leaf] : query_bounds[leaf + 1]]
        if len(rows):
            candidates = member_rows[member_bounds[leaf] : member_bounds[leaf + 1]]
            leaf_k = min(k, len(candidates))
            searcher = brute_force_searcher(unit[candidates], leaf_k)
            found, scores = searcher.search_batched_parallel(unit[rows], final_num_neighbors=leaf_k)
            yield rows, candidates[found.astype(np.int64)], scores
        if (leaf + 1) % report_every == 0:
            log.info("neighbours: %d of %d leaves searched (%d products)", leaf + 1, leaves, query_bounds[leaf + 1])


def neighbour_blocks(unit: np.ndarray, k: int, settings: Neighbours, searcher: Optional[Any] = None) -> Iterator[Block]:
    """Every row's top-``k`` (itself included): exact below ``brute_force_below`` rows (with
    ``searcher``, an exact one of ``unit``, where already built), partitioned above."""
    if len(unit) < settings.brute_force_below:
        return exact_blocks(searcher or brute_force_searcher(unit, k), unit, k, settings.query_chunk)
    return partitioned_blocks(unit, k, settings)


def search_group(
    ids: Sequence[str], vectors: np.ndarray, settings: Neighbours, searcher_dir: Optional[str] = None
) -> Iterator[Tuple[str, List[Tuple[str, float]]]]:
    """Each product's top-k neighbours (itself excluded) among ``ids``: exact below
    ``brute_force_below`` products, partitioned above; with ``searcher_dir``, an exact ScaNN searcher
    of the group is serialised there for single new products."""
    unit, ok = normalise(vectors)
    keep = np.flatnonzero(ok)
    ids = [ids[i] for i in keep]
    unit = unit[keep]
    if len(ids) < 2:
        for pid in ids:
            yield pid, []
        return
    k = min(settings.k, len(ids) - 1)
    searcher = None
    if searcher_dir is not None:
        searcher = brute_force_searcher(unit, k + 1)
        searcher.serialize(searcher_dir, relative_path=True)  # loadable wherever the folder is copied
    for rows, found, scores in neighbour_blocks(unit, k + 1, settings, searcher):
        # whole blocks to Python lists first: per-element numpy scalars took most of this loop
        finite = np.isfinite(scores).tolist()
        for me, idx, sc, ok in zip(rows.tolist(), found.tolist(), scores.tolist(), finite):
            pairs = [(ids[j], round(s, 5)) for j, s, usable in zip(idx, sc, ok) if j != me and usable][:k]
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


def keyed_row(row: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """(id, clean row), the embedding as a float32 array: between Beam stages one pickled block
    instead of a list of 1,280 floats encoded one by one."""
    if row.get("image_embedding") is not None:
        row = {**row, "image_embedding": np.asarray(row["image_embedding"], dtype=np.float32)}
    return row["id"], row


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
            | "Parse" >> beam.Map(orjson.loads)
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
            | "Encode" >> beam.Map(lambda r: orjson.dumps(r, option=orjson.OPT_SORT_KEYS))
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
        with beam.Pipeline(options=PipelineOptions(list(beam_args or [f"--runner={LOCAL_BEAM_RUNNER}"]))) as p:
            rows = (
                p
                | "ReadCleanRows" >> beam.io.ReadFromParquet(storage.join(preprocess_dir, "clean", "*.parquet"), columns=columns)
                | "KeyRowsById" >> beam.Map(keyed_row)
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
