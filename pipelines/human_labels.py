"""Import human labels from a CSV into the product documents (partial updates).

The file has a header with ``id`` and ``category`` (a category id such as ``Footwear > Shoes >
Flats``); a product may have several rows. A product's rows replace its human labels (the
documents' ``labels.human_field``), so importing a file twice changes nothing. Bad rows never stop
the import: the good rows are imported and each bad one is reported with its line and reason
(``malformed_row``, ``unknown_category``, ``unknown_id``), and counted.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

from core.taxonomy import CategoryTree

log = logging.getLogger(__name__)

COLUMNS = ("id", "category")
MALFORMED = "malformed_row"
UNKNOWN_CATEGORY = "unknown_category"
UNKNOWN_ID = "unknown_id"
MGET_CHUNK = 1000


@dataclasses.dataclass(frozen=True)
class BadRow:
    line: int  # 1-based line of the file (the header is line 1)
    reason: str
    row: str


def parse_labels(text: str, tree: CategoryTree) -> Tuple[Dict[str, List[str]], List[BadRow]]:
    """Product id -> its categories (in file order, without repeats), and the bad rows. A file
    without the ``id`` and ``category`` columns is refused as a whole (ValueError)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or not set(COLUMNS) <= {h.strip() for h in header}:
        raise ValueError(f"the label file needs a header with the columns {list(COLUMNS)}; got {header}")
    position = {h.strip(): i for i, h in enumerate(header)}
    labels: Dict[str, List[str]] = {}
    bad: List[BadRow] = []
    for line, fields in enumerate(reader, start=2):
        raw = ",".join(fields)
        if not fields or all(not f.strip() for f in fields):
            continue  # blank line
        if len(fields) != len(header):
            bad.append(BadRow(line, MALFORMED, raw))
            continue
        pid, category = fields[position["id"]].strip(), fields[position["category"]].strip()
        if not pid or not category:
            bad.append(BadRow(line, MALFORMED, raw))
        elif category not in tree:
            bad.append(BadRow(line, UNKNOWN_CATEGORY, raw))
        elif category not in labels.setdefault(pid, []):
            labels[pid].append(category)
    return labels, bad


def existing_ids(es, index: str, ids: Sequence[str]) -> set:
    """The ids of ``ids`` that are documents of ``index``."""
    found = set()
    for start in range(0, len(ids), MGET_CHUNK):
        chunk = list(ids[start : start + MGET_CHUNK])
        docs = es.mget(index=index, ids=chunk, source=False)["docs"]
        found.update(d["_id"] for d in docs if d.get("found"))
    return found


def update_actions(index: str, field: str, labels: Mapping[str, List[str]]) -> Iterable[dict]:
    """One partial update per product: its human labels replaced, nothing else touched."""
    for pid, categories in labels.items():
        yield {"_op_type": "update", "_index": index, "_id": pid, "doc": {field: categories}}


def import_labels(es, products_index: str, field: str, text: str, tree: CategoryTree) -> dict:
    """Imports the label file ``text`` into ``products_index``; returns the counts and every bad
    row with its reason."""
    from elasticsearch import helpers

    labels, bad = parse_labels(text, tree)
    known = existing_ids(es, products_index, sorted(labels))
    lines = _lines_by_id(text, set(labels) - known)
    for pid in sorted(set(labels) - known):
        bad.extend(BadRow(line, UNKNOWN_ID, row) for line, row in lines[pid])
    good = {pid: cats for pid, cats in labels.items() if pid in known}
    updated, errors = helpers.bulk(es, update_actions(products_index, field, good), raise_on_error=False, refresh=True)
    if errors:
        raise RuntimeError(f"{len(errors)} label updates failed; first: {errors[0]}")
    bad.sort(key=lambda b: b.line)
    counts: Dict[str, int] = {}
    for b in bad:
        counts[b.reason] = counts.get(b.reason, 0) + 1
    summary = {
        "products_updated": updated,
        "labels_imported": sum(len(c) for c in good.values()),
        "bad_rows": len(bad),
        "bad_rows_by_reason": counts,
        "bad": [dataclasses.asdict(b) for b in bad],
    }
    log.info("imported human labels of %d products; %d bad rows %s", updated, len(bad), counts)
    return summary


def _lines_by_id(text: str, ids: set) -> Dict[str, List[Tuple[int, str]]]:
    """The (line, row) of each good row whose product id is in ``ids``."""
    out: Dict[str, List[Tuple[int, str]]] = {pid: [] for pid in ids}
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader)]
    for line, fields in enumerate(reader, start=2):
        if len(fields) == len(header) and fields[header.index("id")].strip() in ids:
            out[fields[header.index("id")].strip()].append((line, ",".join(fields)))
    return out
