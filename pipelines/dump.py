"""Dump products from Elasticsearch: point-in-time + ``search_after`` in parallel slices.

Each slice streams pages into its own gzip JSON-lines file, so memory stays flat in the
number of products. Files land in a temporary folder that replaces the stage folder
only when every slice finished (see :func:`core.storage.atomic_stage`).
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import logging
from typing import Iterator, Optional, Sequence, Tuple

from elasticsearch import Elasticsearch

from core import storage
from core.config import FeatureConfig
from core.taxonomy import CategoryTree

log = logging.getLogger(__name__)


def product_fields(cfg: FeatureConfig) -> Tuple[str, ...]:
    """The document fields the pipeline reads: the inputs' and labels' sources (rule, human and
    ground-truth labels), and the id."""
    sources = {i.source for i in cfg.inputs} | {a.source for a in cfg.labels.attributes}
    return ("id", *sorted(sources | {cfg.labels.rule_field, cfg.labels.human_field, cfg.labels.ground_truth_field}))


def slice_file(slice_id: int, slices: int) -> str:
    """The name of a dump's file for one of its ``slices`` slices (preprocessing reads ``products-*.jsonl.gz``)."""
    return f"products-{slice_id:05d}-of-{slices:05d}.jsonl.gz"


def iter_slice(
    es: Elasticsearch,
    pit_id: str,
    slice_id: int,
    slices: int,
    page_size: int,
    query: dict,
    fields: Sequence[str],
    keep_alive: str = "5m",
) -> Iterator[dict]:
    """Every document of one PIT slice, page by page, sorted by ``_shard_doc``."""
    search_after = None
    while True:
        body = {
            "size": page_size,
            "pit": {"id": pit_id, "keep_alive": keep_alive},
            "sort": [{"_shard_doc": "asc"}],
            "query": query,
            "_source": list(fields),
        }
        if slices > 1:
            body["slice"] = {"id": slice_id, "max": slices}
        if search_after is not None:
            body["search_after"] = search_after
        hits = es.search(**body)["hits"]["hits"]
        if not hits:
            return
        for hit in hits:
            yield hit["_source"]
        search_after = hits[-1]["sort"]


def product_query(rule_field: str, limit_categories: Optional[Sequence[str]] = None) -> dict:
    """Products in a category subset: a rule label (document field ``rule_field``) or a previous
    prediction at or below one of the categories. The ground truth is never used to choose what the
    pipeline sees."""
    if not limit_categories:
        return {"match_all": {}}
    should = []
    for field in (rule_field, "predicted_categories.id"):
        for c in limit_categories:
            should += [{"term": {field: c}}, {"prefix": {field: f"{c} > "}}]
    return {"bool": {"should": should, "minimum_should_match": 1}}


def dump_products(
    es: Elasticsearch,
    products_index: str,
    categories_index: str,
    out_dir: str,
    fields: Sequence[str],
    slices: int = 1,
    page_size: int = 10000,
    limit: Optional[int] = None,
    query: Optional[dict] = None,
) -> dict:
    """Writes ``products-SSSSS.jsonl.gz`` per slice (the documents' ``fields``) and
    ``categories.json``; returns counts.

    ``limit`` caps the number of products (taken as evenly as slices allow), for trial runs.
    """
    query = query or {"match_all": {}}
    per_slice = None if limit is None else -(-limit // slices)
    if per_slice is not None:
        page_size = min(page_size, per_slice)
    pit = es.open_point_in_time(index=products_index, keep_alive="5m")["id"]
    try:
        with storage.atomic_stage(out_dir) as tmp:

            def write_slice(slice_id: int) -> int:
                path = storage.join(tmp, slice_file(slice_id, slices))
                n = 0
                with storage.open_write(path) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
                    for doc in iter_slice(es, pit, slice_id, slices, page_size, query, fields):
                        if per_slice is not None and n >= per_slice:
                            break
                        out.write(json.dumps(doc, sort_keys=True).encode("utf-8") + b"\n")
                        n += 1
                return n

            with concurrent.futures.ThreadPoolExecutor(max_workers=slices) as pool:
                counts = list(pool.map(write_slice, range(slices)))
            tree = dump_tree(es, categories_index)
            storage.write_json(storage.join(tmp, "categories.json"), tree.to_records())
            summary = {"products": sum(counts), "categories": len(tree), "slices": slices}
            storage.write_json(storage.join(tmp, "summary.json"), summary)
    finally:
        es.close_point_in_time(id=pit)
    log.info("dumped %s into %s", summary, out_dir)
    return summary


def dump_tree(es: Elasticsearch, categories_index: str) -> CategoryTree:
    pit = es.open_point_in_time(index=categories_index, keep_alive="1m")["id"]
    try:
        records = list(iter_slice(es, pit, 0, 1, 1000, {"match_all": {}}, ("id", "name", "parent", "level")))
    finally:
        es.close_point_in_time(id=pit)
    return CategoryTree.from_records(records)


def read_tree(dump_dir: str) -> CategoryTree:
    return CategoryTree.from_records(storage.read_json(storage.join(dump_dir, "categories.json")))
