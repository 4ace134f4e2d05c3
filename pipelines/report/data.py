"""The report's data section: this run's statistics against the previous good run's, and the
preprocessing dead letters by reason with examples."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional

from core import storage
from pipelines.statistics import PREVIOUS_FILE, STATISTICS_FILE

EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 300


def _change(now: Optional[float], before: Optional[float]) -> Optional[float]:
    return None if now is None or before is None else now - before


def statistics_comparison(statistics_dir: str) -> Dict[str, Any]:
    """Rows, label coverage and per-feature missing rate, vocabulary size and length, each beside
    the previous good run's value; the anomalies the validation found."""
    current = storage.read_json(storage.join(statistics_dir, STATISTICS_FILE))
    previous_path = storage.join(statistics_dir, PREVIOUS_FILE)
    previous = storage.read_json(previous_path) if storage.exists(previous_path) else None
    before_features = previous["features"] if previous else {}
    features = []
    for name, stats in sorted(current["features"].items()):
        before = before_features.get(name, {})
        features.append(
            {
                "name": name,
                **{
                    f"{key}_{when}": source.get(key)
                    for key in ("missing_rate", "vocabulary_size", "mean_chars")
                    for when, source in (("now", stats), ("before", before))
                },
                "missing_rate_change": _change(stats.get("missing_rate"), before.get("missing_rate")),
            }
        )
    return {
        "version": current["version"],
        "compared_with_version": current.get("compared_with_version"),
        "passed": current["passed"],
        "anomalies": current["anomalies"],
        "rows": {"now": current["rows"], "before": previous["rows"] if previous else None},
        "labelled_rate": {"now": current["labels"]["labelled_rate"], "before": previous["labels"]["labelled_rate"] if previous else None},
        "categories_used": {
            "now": current["labels"]["categories_used"],
            "before": previous["labels"]["categories_used"] if previous else None,
        },
        "features": features,
    }


def dead_letters(preprocess_dir: str) -> List[Dict[str, Any]]:
    """Per rejection reason, most frequent first: the count and a few example records (cut short)."""
    counts: Counter = Counter()
    examples: Dict[str, List[str]] = defaultdict(list)
    for path in storage.list_files(storage.join(preprocess_dir, "dead_letters"), "*.jsonl"):
        with storage.open_read(path) as f:
            for line in f.read().decode("utf-8").splitlines():
                if not line.strip():
                    continue
                letter = json.loads(line)
                counts[letter["reason"]] += 1
                if len(examples[letter["reason"]]) < EXAMPLES_PER_REASON:
                    record = letter["record"]
                    examples[letter["reason"]].append(record if len(record) <= EXAMPLE_CHARS else record[:EXAMPLE_CHARS] + " …")
    return [{"reason": reason, "count": n, "examples": examples[reason]} for reason, n in counts.most_common()]
