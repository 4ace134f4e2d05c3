"""Batch prediction of every product through the exported raw-input model, streamed in batches."""

from __future__ import annotations

import gzip
import json
import logging
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from core import storage
from core.config import FeatureConfig
from core.rows import read_clean_rows
from trainer.hierarchy import best_path, category_entries, decide
from trainer.serving import ServingModel, raw_batch

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl.gz"


def score_batches(
    cfg: FeatureConfig, model: ServingModel, rows: Iterator[dict], batch_size: int = 1024
) -> Iterator[Tuple[List[dict], Dict[str, np.ndarray]]]:
    """``(rows, model outputs)`` per batch; memory is bounded by ``batch_size``."""
    batch: List[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield batch, model.predict(raw_batch(cfg, batch))
            batch = []
    if batch:
        yield batch, model.predict(raw_batch(cfg, batch))


def attribute_predictions(model: ServingModel, outputs: Dict[str, np.ndarray], i: int, attribute_names: Sequence[str]) -> dict:
    vocab = model.attribute_values()
    out = {}
    for name in attribute_names:
        probs = outputs[f"{name}_probs"][i]
        if not vocab.get(name):
            continue
        best = int(np.argmax(probs))
        out[name] = {"value": vocab[name][best], "score": round(float(probs[best]), 5)}
    return out


def predict_all(cfg: FeatureConfig, model_dir: str, preprocess_dir: str, out_dir: str, batch_size: int = 1024) -> dict:
    """Writes one JSON line per product: categories (with ancestors and scores) and attributes."""
    model = ServingModel.load(model_dir)
    attribute_names = [a.name for a in cfg.labels.attributes]
    count = 0
    with storage.atomic_stage(out_dir) as tmp:
        with storage.open_write(storage.join(tmp, PREDICTIONS_FILE)) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            for rows, outputs in score_batches(cfg, model, read_clean_rows(preprocess_dir), batch_size):
                positive, closed = decide(outputs["category_scores"], model.thresholds, model.tree, model.rule_labels(rows))
                for i, row in enumerate(rows):
                    record = {
                        "id": row["id"],
                        "model_version": model.card["model_version"],
                        "categories": category_entries(closed[i], positive[i], model.tree),
                        "path": [model.tree.ids[j] for j in best_path(closed[i], model.tree)],
                        "attributes": attribute_predictions(model, outputs, i, attribute_names),
                    }
                    f.write(json.dumps(record, sort_keys=True).encode("utf-8") + b"\n")
                    count += 1
        summary = {"products": count, "model_version": model.card["model_version"]}
        storage.write_json(storage.join(tmp, "summary.json"), summary)
    log.info("predicted %d products with model %s", count, model.card["model_version"])
    return summary


def read_predictions(predict_dir: str) -> Iterator[dict]:
    return storage.read_json_lines(predict_dir, PREDICTIONS_FILE)
