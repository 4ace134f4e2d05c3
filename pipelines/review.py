"""Writes a run's review records (chosen in the predict stage by ``trainer.review``) into the
review index, one document per run and product."""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

from core import storage
from trainer.review import REVIEW_FILE

log = logging.getLogger(__name__)


def review_doc_id(run_id: str, product_id: str) -> str:
    """One document per run and product: a rerun of the run overwrites, never duplicates."""
    return f"{run_id}:{product_id}"


def review_actions(index: str, records: Iterable[dict]) -> Iterator[dict]:
    for r in records:
        yield {"_index": index, "_id": review_doc_id(r["run_id"], r["product_id"]), "_source": r}


def write_review(es, index: str, predict_dir: str) -> int:
    """Indexes the predict stage's review records into ``index``; returns how many."""
    from elasticsearch import helpers

    from services.search_index import REVIEW_MAPPINGS, ensure_index

    ensure_index(es, index, REVIEW_MAPPINGS)
    records = list(storage.read_json_lines(storage.require_complete(predict_dir), REVIEW_FILE))
    ok, errors = helpers.bulk(es, review_actions(index, records), raise_on_error=False, refresh=True)
    if errors:
        raise RuntimeError(f"{len(errors)} review documents were not indexed; first: {errors[0]}")
    log.info("wrote %d review documents into %s", ok, index)
    return ok
