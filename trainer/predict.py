"""Batch prediction of every product through the exported raw-input model, streamed in batches."""

from __future__ import annotations

import dataclasses
import gzip
import logging
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import orjson

from core import storage
from core.config import FeatureConfig
from core.rows import HUMAN_CATEGORIES, RULE_CATEGORIES, read_clean_rows
from core.taxonomy import CategoryTree
from trainer.fewshot import (
    PROBE,
    LinearProbe,
    Matches,
    Prototypes,
    apply_matches,
    build_prototypes,
    decided_by,
    fit_probe,
    group_examples,
    match,
    match_probe,
)
from trainer.hierarchy import best_paths, category_entries, decide
from trainer.review import REVIEW_FILE, ReviewCollector
from trainer.serving import EMBEDDING, ServingModel, raw_batch

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl.gz"
EMBEDDINGS_FILE = "embeddings.f16"  # float16 rows, one per prediction line, dim in summary.json
PROTOTYPES_FILE = "prototypes.json"


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


def prototype_examples(
    cfg: FeatureConfig, model: ServingModel, preprocess_dir: str, batch_size: int
) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Embeddings of the human-labelled products by their deepest human category, and of up to
    ``fewshot.rule_examples`` rule-labelled products per finest-level category (the competitors)."""
    tree = model.tree
    taken: Counter = Counter()
    chosen: List[Tuple[bool, str, dict]] = []  # (human?, category, row)
    for row in read_clean_rows(preprocess_dir):
        human_ids = [c for c in row.get(HUMAN_CATEGORIES) or [] if c in tree]
        finest = [c for c in row.get(RULE_CATEGORIES) or [] if c in tree and tree.level_of(c) == tree.levels]
        if human_ids:
            chosen.append((True, max(human_ids, key=tree.level_of), row))
        elif len(finest) == 1 and taken[finest[0]] < cfg.fewshot.rule_examples:
            taken[finest[0]] += 1
            chosen.append((False, finest[0], row))
    embeddings = [
        model.predict(raw_batch(cfg, [r for _, _, r in chosen[i : i + batch_size]]))[EMBEDDING] for i in range(0, len(chosen), batch_size)
    ]
    flat = np.concatenate(embeddings) if embeddings else np.zeros((0, 0), dtype=np.float32)
    human = group_examples(flat, [c if h else None for h, c, _ in chosen])
    rules = group_examples(flat, [None if h else c for h, c, _ in chosen])
    return human, rules


@dataclasses.dataclass(frozen=True)
class FewshotClassifier:
    """The configured few-shot classifier over the embedding, with the prototypes it was built from."""

    name: str
    prototypes: Prototypes
    probe: Optional[LinearProbe]

    def match(self, embeddings: np.ndarray, kept: np.ndarray, tree: CategoryTree) -> Matches:
        if self.name == PROBE:
            return match_probe(self.probe, self.prototypes, embeddings, kept, tree)
        return match(self.prototypes, embeddings, kept, tree)


def load_fewshot(cfg: FeatureConfig, model: ServingModel, preprocess_dir: str, batch_size: int) -> FewshotClassifier:
    f = cfg.fewshot
    human, rules = prototype_examples(cfg, model, preprocess_dir, batch_size)
    prototypes = build_prototypes(human, rules, f.min_examples, f.min_similarity, f.threshold_margin)
    probe = fit_probe(prototypes, human, rules, f.probe_c) if f.classifier == PROBE else None
    return FewshotClassifier(f.classifier, prototypes, probe)


def predict_all(cfg: FeatureConfig, model_dir: str, preprocess_dir: str, out_dir: str, run_id: str, batch_size: int = 1024) -> dict:
    """Writes one JSON line per product: categories (with ancestors and scores), which classifier
    decided the finest level, the nearest human-labelled prototype, and attributes; each product's
    embedding (float16 rows in the same order, :func:`read_embeddings`); the prototypes; and the
    run's review queue (:mod:`pipelines.review`)."""
    model = ServingModel.load(model_dir)
    tree = model.tree
    attribute_names = [a.name for a in cfg.labels.attributes]
    fewshot = load_fewshot(cfg, model, preprocess_dir, batch_size)
    prototypes = fewshot.prototypes
    few = [j for j, (h, n) in enumerate(zip(prototypes.human, prototypes.counts)) if h and n < cfg.review.few_examples_below]
    review = ReviewCollector(cfg.review, tree, run_id, model.card["model_version"])
    finest = tree.level_columns(tree.levels)
    title_field = next(i.source for i in cfg.inputs_of("text"))
    count, dim, by = 0, 0, Counter()
    with storage.atomic_stage(out_dir) as tmp:
        with (
            storage.open_write(storage.join(tmp, PREDICTIONS_FILE)) as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f,
            storage.open_write(storage.join(tmp, EMBEDDINGS_FILE)) as emb_out,
        ):
            for rows, outputs in score_batches(cfg, model, read_clean_rows(preprocess_dir), batch_size):
                known = model.known_labels(rows)
                kept = known if model.card["model"].get("keep_rule_labels") else None
                raw_scores = outputs["category_scores"]
                positive, closed = decide(raw_scores, model.thresholds, tree, kept)
                model_finest = positive[:, finest].any(axis=1)
                matches = fewshot.match(outputs[EMBEDDING], known, tree)
                positive, closed = apply_matches(positive, closed, matches, prototypes, tree)
                human_finest = np.array(
                    [any(tree.level_of(c) == tree.levels for c in r.get(HUMAN_CATEGORIES) or [] if c in tree) for r in rows]
                )
                decided = decided_by(matches, human_finest, known[:, finest].any(axis=1) & ~human_finest, model_finest, fewshot.name)
                by.update(decided)
                sims = outputs[EMBEDDING] @ prototypes.vectors[few].T if few else np.zeros((len(rows), 0))
                paths = best_paths(closed, tree)
                review.add_batch(
                    rows,
                    raw_scores,
                    model.thresholds,
                    known,
                    decided,
                    {prototypes.categories[j]: sims[:, k] for k, j in enumerate(few)},
                    title_field,
                )
                for i, row in enumerate(rows):
                    record = {
                        "id": row["id"],
                        "model_version": model.card["model_version"],
                        "categories": category_entries(closed[i], positive[i], tree, paths[i]),
                        "path": [tree.ids[j] for j in paths[i]],
                        "decided_by": decided[i],
                        "fewshot": fewshot_entry(matches, fewshot, i),
                        "attributes": attribute_predictions(model, outputs, i, attribute_names),
                    }
                    f.write(orjson.dumps(record, option=orjson.OPT_SORT_KEYS) + b"\n")
                    count += 1
                embeddings = outputs[EMBEDDING].astype(np.float16)
                dim = embeddings.shape[1]
                emb_out.write(embeddings.tobytes())
        review_records = review.records()
        with storage.open_write(storage.join(tmp, REVIEW_FILE)) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            for r in review_records:
                f.write(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) + b"\n")
        storage.write_json(storage.join(tmp, PROTOTYPES_FILE), prototypes.to_json())
        summary = {
            "products": count,
            "model_version": model.card["model_version"],
            "embedding_dim": dim,
            "decided_by": dict(sorted(by.items())),
            "human_prototypes": len(prototypes.human_categories),
            "review_records": len(review_records),
        }
        storage.write_json(storage.join(tmp, "summary.json"), summary)
    log.info("predicted %d products with model %s: %s", count, model.card["model_version"], summary)
    return summary


def fewshot_entry(matches: Matches, fewshot: FewshotClassifier, i: int) -> Optional[dict]:
    """The few-shot classifier's best human-labelled category for the product: its score (the
    probe's probability or the prototype's cosine), threshold, and whether it decided."""
    if matches.category[i] < 0:
        return None
    return {
        "classifier": fewshot.name,
        "category": fewshot.prototypes.categories[matches.category[i]],
        "score": round(float(matches.similarity[i]), 5),
        "threshold": round(float(matches.threshold[i]), 5),
        "decided": bool(matches.decides[i]),
    }


def read_embeddings(predict_dir: str) -> np.ndarray:
    """The predict stage's embeddings ``[products, dim]`` (float16), in the order of its predictions."""
    dim = storage.read_json(storage.join(storage.require_complete(predict_dir), "summary.json"))["embedding_dim"]
    with storage.open_read(storage.join(predict_dir, EMBEDDINGS_FILE)) as f:
        return np.frombuffer(f.read(), dtype=np.float16).reshape(-1, dim) if dim else np.zeros((0, 0), dtype=np.float16)


def read_predictions(predict_dir: str) -> Iterator[dict]:
    return storage.read_json_lines(predict_dir, PREDICTIONS_FILE)
