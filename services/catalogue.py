"""A Myntra-format catalogue (``styles.csv`` + ``images/``) as product documents.

The rule-based labeller lives here too: it plays the retailer's rule system, writing
positive-only, incomplete ``rule_categories``. The true category stays on the document
as ground truth for evaluation only.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import yaml

from core.taxonomy import CategoryTree, path_id

log = logging.getLogger(__name__)

TREE_COLUMNS = ("masterCategory", "subCategory", "articleType")


@dataclasses.dataclass(frozen=True)
class Rule:
    category: str
    patterns: Tuple[re.Pattern, ...]


class RuleLabeller:
    """Keyword/regex rules on the title -> category ids (positive-only, incomplete)."""

    def __init__(self, rules: Sequence[Rule], tree: CategoryTree):
        unknown = sorted({r.category for r in rules} - set(tree.ids))
        if unknown:
            raise ValueError(f"labelling rules name categories not in the tree: {unknown}")
        self.rules = tuple(rules)

    @classmethod
    def from_yaml(cls, path: str, tree: CategoryTree) -> RuleLabeller:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        rules = [Rule(category=r["category"], patterns=tuple(re.compile(p, re.IGNORECASE) for p in r["patterns"])) for r in raw["rules"]]
        return cls(rules, tree)

    def label(self, title: str) -> List[str]:
        """The categories whose rules match ``title``, most specific rules kept as written."""
        return sorted({r.category for r in self.rules if any(p.search(title or "") for p in r.patterns)})


def read_styles(styles_csv: Path) -> Iterator[Dict[str, str]]:
    """Rows of a Myntra ``styles.csv``; rows with a broken column count are skipped and logged."""
    with open(styles_csv, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        for line_no, row in enumerate(reader, start=2):
            if len(row) > len(header):  # titles with unquoted commas
                row = row[: len(header) - 1] + [",".join(row[len(header) - 1 :])]
            if len(row) != len(header):
                log.warning("styles.csv line %d: %d columns, expected %d; skipped", line_no, len(row), len(header))
                continue
            yield dict(zip(header, row))


def tree_from_styles(styles_csv: Path) -> CategoryTree:
    return CategoryTree.from_paths({tuple(r[c] for c in TREE_COLUMNS) for r in read_styles(styles_csv)})


def product_documents(
    catalogue_dir: Path,
    labeller: RuleLabeller,
    image_base_url: str,
    limit: Optional[int] = None,
) -> Iterator[dict]:
    """One Elasticsearch document per product of a Myntra-format catalogue folder."""
    images = {p.stem for p in (catalogue_dir / "images").glob("*.jpg")}
    for n, row in enumerate(read_styles(catalogue_dir / "styles.csv")):
        if limit is not None and n >= limit:
            return
        pid = row["id"]
        title = row["productDisplayName"]
        yield {
            "id": pid,
            "title": title,
            "gender": row["gender"] or None,
            "base_colour": row["baseColour"] or None,
            "season": row["season"] or None,
            "usage": row["usage"] or None,
            "year": int(row["year"]) if row["year"].isdigit() else None,
            "image_url": f"{image_base_url.rstrip('/')}/{pid}.jpg" if pid in images else None,
            "true_category": path_id([row[c] for c in TREE_COLUMNS]),
            "rule_categories": labeller.label(title),
        }
