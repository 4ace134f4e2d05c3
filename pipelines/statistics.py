"""Statistics and anomalies before training (the StatisticsGen / ExampleValidator idea; TFDV has
no release for TF 2.21): per-feature missing rate, length and vocabulary size, label counts,
compared with the previous successful run. Breakage past the configured thresholds fails the
run with a message naming the feature, or only warns, as configured."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Dict, List, Optional

from core import inputs, storage
from core.config import FeatureConfig, Validation
from core.rows import RULE_CATEGORIES, read_clean_rows

log = logging.getLogger(__name__)

STATISTICS_FILE = "statistics.json"
PREVIOUS_FILE = "previous_statistics.json"  # what this run was compared with, for the run report


class DataAnomalyError(ValueError):
    """The run's data broke a configured threshold; the message names each feature."""


def vocabulary_size(preprocess_dir: str, name: str) -> Optional[int]:
    path = storage.join(preprocess_dir, "transform_fn", "transform_fn", "assets", name)
    if not storage.exists(path):
        return None
    with storage.open_read(path) as f:
        return sum(1 for line in f.read().splitlines() if line)


def compute_statistics(cfg: FeatureConfig, preprocess_dir: str) -> Dict:
    """Feature and label statistics of a finished preprocessing stage."""
    sources = sorted(set(inputs.string_columns(cfg)) | {a.source for a in cfg.labels.attributes})
    missing: Counter = Counter()
    chars: Counter = Counter()
    labels: Counter = Counter()
    rows = labelled = no_image = 0
    for row in read_clean_rows(preprocess_dir, columns=[*sources, RULE_CATEGORIES, "has_image"]):
        rows += 1
        for s in sources:
            value = row.get(s) or ""
            missing[s] += not value
            chars[s] += len(value)
        labelled += bool(row[RULE_CATEGORIES])
        labels.update(row[RULE_CATEGORIES] or [])
        no_image += not row["has_image"]
    features = {s: {"missing_rate": missing[s] / max(rows, 1), "mean_chars": chars[s] / max(rows, 1)} for s in sources}
    for inp in cfg.inputs:
        vocabulary = inputs.KINDS[inp.kind].vocabulary(inp)
        if vocabulary is not None:
            features.setdefault(inp.name, {})["vocabulary_size"] = vocabulary_size(preprocess_dir, vocabulary)
    if cfg.image is not None:
        features[cfg.image.name] = {"missing_rate": no_image / max(rows, 1)}
    return {
        "rows": rows,
        "features": features,
        "labels": {"labelled_rate": labelled / max(rows, 1), "categories_used": len(labels), "counts": dict(labels.most_common())},
    }


def find_anomalies(current: Dict, previous: Optional[Dict], limits: Validation) -> List[str]:
    """Messages, one per broken threshold, each naming its feature."""
    out = []
    if current["rows"] < limits.min_rows:
        out.append(f"rows: {current['rows']} products, fewer than {limits.min_rows}")
    for name, stats in current["features"].items():
        rate = stats.get("missing_rate")
        if rate is not None and rate > limits.max_missing_rate.get(name, limits.default_max_missing_rate):
            out.append(f"{name}: missing in {rate:.1%} of products")
    if previous is None:
        return out
    for name, stats in current["features"].items():
        before = previous["features"].get(name, {})
        if (
            "missing_rate" in stats
            and "missing_rate" in before
            and stats["missing_rate"] - before["missing_rate"] > limits.max_missing_rate_increase
        ):
            out.append(f"{name}: missing rate rose from {before['missing_rate']:.1%} to {stats['missing_rate']:.1%}")
        new, old = stats.get("vocabulary_size"), before.get("vocabulary_size")
        if new and old and abs(new - old) / old > limits.max_vocabulary_change:
            out.append(f"{name}: vocabulary size changed from {old} to {new}")
    if previous["rows"] and abs(current["rows"] - previous["rows"]) / previous["rows"] > limits.max_row_change:
        out.append(f"rows: {previous['rows']} -> {current['rows']} products")
    old_rate, new_rate = previous["labels"]["labelled_rate"], current["labels"]["labelled_rate"]
    if old_rate - new_rate > limits.max_labelled_rate_drop:
        out.append(f"labels: labelled share fell from {old_rate:.1%} to {new_rate:.1%}")
    return out


def previous_statistics(data_root: str, run_dir: str) -> Optional[Dict]:
    """The statistics of the most recent other run that passed validation."""
    candidates = []
    for path in storage.list_files(storage.join(data_root, "runs"), f"*/*/statistics/{STATISTICS_FILE}"):
        if not path.startswith(run_dir.rstrip("/") + "/"):
            stats = storage.read_json(path)
            if stats.get("passed"):
                candidates.append(stats)
    return max(candidates, key=lambda s: s["version"]) if candidates else None


def validate(cfg: FeatureConfig, preprocess_dir: str, out_dir: str, previous: Optional[Dict], version: int) -> Dict:
    """Writes the run's statistics and anomalies; raises :class:`DataAnomalyError` if configured to fail."""
    current = compute_statistics(cfg, preprocess_dir)
    anomalies = find_anomalies(current, previous, cfg.validation)
    failing = bool(anomalies) and cfg.validation.on_anomaly == "fail"
    result = {
        **current,
        "version": version,
        "anomalies": anomalies,
        "passed": not failing,
        "compared_with_version": previous["version"] if previous else None,
    }
    with storage.atomic_stage(out_dir) as tmp:
        storage.write_json(storage.join(tmp, STATISTICS_FILE), result)
        if previous is not None:
            storage.write_json(storage.join(tmp, PREVIOUS_FILE), previous)
    for message in anomalies:
        log.warning("data anomaly: %s", message)
    if failing:
        raise DataAnomalyError("data validation failed: " + "; ".join(anomalies))
    return result
