"""One short line of counts per finished stage of a run folder, from the stages' own summaries:
the report's overview table and the demo's one line per task."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from core import storage

# the DAG tasks' stage folders
TASK_STAGES = {
    "dump": "dump",
    "preprocess": "preprocess",
    "validate_statistics": "statistics",
    "train": "model",
    "evaluate": "evaluation",
    "predict": "predict",
    "publish": "publish",
    "wait_indexed": "indexed",
    "neighbours": "neighbours",
    "report": "report",
}


def read_stage_json(run_dir: str, stage: str, name: str) -> Optional[Any]:
    """A JSON file of a finished stage, or None where the stage or the file is missing."""
    stage_dir = storage.join(run_dir, stage)
    path = storage.join(stage_dir, name)
    if not storage.is_complete(stage_dir) or not storage.exists(path):
        return None
    return storage.read_json(path)


def _counted(counters: Dict[str, int], prefix: str) -> int:
    return sum(v for k, v in counters.items() if k.startswith(prefix))


def _dump(run_dir: str) -> Optional[str]:
    s = read_stage_json(run_dir, "dump", "summary.json")
    return s and f"{s['products']} products, {s['categories']} categories"


def _preprocess(run_dir: str) -> Optional[str]:
    s = read_stage_json(run_dir, "preprocess", "summary.json")
    if not s:
        return None
    c = s["counters"]
    return (
        f"{_counted(c, 'valid_')} valid ({c.get('valid_train', 0)}/{c.get('valid_eval', 0)}/{c.get('valid_test', 0)}), "
        f"{_counted(c, 'rejected_')} dead letters, {_counted(c, 'degraded_image_')} without image"
    )


def _statistics(run_dir: str) -> Optional[str]:
    s = read_stage_json(run_dir, "statistics", "statistics.json")
    if not s:
        return None
    against = f"vs version {s['compared_with_version']}" if s.get("compared_with_version") else "no previous run"
    return f"{s['rows']} rows, {len(s['anomalies'])} anomalies ({against})"


def _model(run_dir: str) -> Optional[str]:
    card = read_stage_json(run_dir, "model", "model_card.json")
    if not card:
        return None
    epochs = len(next(iter(card["history"].values()), []))
    return f"{card['model']['type']}, {epochs} epochs, {card['train_examples_per_s']:.0f} examples/s"


def _evaluation(run_dir: str) -> Optional[str]:
    metrics = read_stage_json(run_dir, "evaluation", "metrics.json")
    blessing = read_stage_json(run_dir, "evaluation", "blessing.json")
    if not metrics:
        return None
    truth = metrics.get("ground_truth", {})
    text = f"{metrics['examples']} test products, hierarchical F1 {truth.get('hierarchical_f1', 0):.3f} vs ground truth"
    return text + (f", {'blessed' if blessing['blessed'] else 'not blessed'}" if blessing else "")


def _predict(run_dir: str) -> Optional[str]:
    s = read_stage_json(run_dir, "predict", "summary.json")
    return s and f"{s['products']} products"


def _publish(run_dir: str) -> Optional[str]:
    s = read_stage_json(run_dir, "publish", "summary.json")
    return s and f"{s['sent']} updates sent" + (f", {s['unchanged']} unchanged not sent" if s.get("unchanged") else "")


def _indexed(run_dir: str) -> Optional[str]:
    s = read_stage_json(run_dir, "indexed", "summary.json")
    if not s:
        return None
    counts = s.get("counts", {})
    return f"{counts.get('indexed', 0)} indexed, {counts.get('dead_lettered', 0)} dead-lettered, {len(s.get('attempts', []))} re-publishes"


def _neighbours(run_dir: str) -> Optional[str]:
    s = read_stage_json(run_dir, "neighbours", "summary.json")
    if not s:
        return None
    c = s["counters"]
    return f"{c.get('products_with_neighbours', 0)} products in {c.get('groups', 0)} groups, k={s['k']}"


SUMMARIES: Dict[str, Callable[[str], Optional[str]]] = {
    "dump": _dump,
    "preprocess": _preprocess,
    "statistics": _statistics,
    "model": _model,
    "evaluation": _evaluation,
    "predict": _predict,
    "publish": _publish,
    "indexed": _indexed,
    "neighbours": _neighbours,
}


def stage_summaries(run_dir: str) -> Dict[str, str]:
    """Stage folder -> one line of counts, for the finished stages of ``run_dir``."""
    out = {}
    for stage, summarise in SUMMARIES.items():
        text = summarise(run_dir)
        if text:
            out[stage] = text
    return out
