"""The DAG's tasks as plain functions: explicit settings in, a run-scoped path out.

Every task reads only its run's folder (and the embedding cache), writes its stage
atomically, and can be rerun alone: a rerun replaces its stage and re-sends idempotent,
versioned updates. Airflow and the CLI are thin callers of these functions.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterator, Optional, Tuple

from pipelines import storage
from pipelines.config import FeatureConfig, load_config
from pipelines.publish import RabbitConnection
from pipelines.search_index import EsConnection

log = logging.getLogger(__name__)

METRICS_INDEX = "prodcat-model-metrics"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything a task needs to know about its run; built by an entry point."""

    data_root: str
    run_id: str
    version: int  # newer runs win in Elasticsearch; from the run's logical date
    config_path: str = "feature_config.yaml"
    products_index: str = "products"
    categories_index: str = "categories"
    es: EsConnection = EsConnection()
    rabbit: RabbitConnection = RabbitConnection()
    beam_args: Tuple[str, ...] = ("--runner=DirectRunner",)
    model_type: Optional[str] = None
    limit: Optional[int] = None
    categories: Tuple[str, ...] = ()
    force_publish: bool = False
    dump_slices: int = 2
    dag_id: str = "prodcat_categorise"

    @property
    def run_dir(self) -> str:
        return storage.run_dir(self.data_root, self.dag_id, self.run_id)

    def stage(self, name: str) -> str:
        return storage.join(self.run_dir, name)

    def config(self) -> FeatureConfig:
        cfg = load_config(self.config_path)
        return cfg.replace_model(type=self.model_type) if self.model_type else cfg

    @property
    def model_version(self) -> str:
        return storage.safe_run_id(self.run_id)


def dump(s: RunSettings) -> str:
    from pipelines.dump import dump_products, product_query

    out = s.stage("dump")
    es = s.es.client()
    dump_products(es, s.products_index, s.categories_index, out, slices=s.dump_slices, limit=s.limit,
                  query=product_query(s.categories))
    return out


def preprocess(s: RunSettings, dump_dir: str) -> str:
    from pipelines.preprocess import preprocess as run_preprocess

    out = s.stage("preprocess")
    run_preprocess(s.config(), dump_dir, out, storage.join(s.data_root, "embedding_cache"), s.beam_args)
    return out


def validate_statistics(s: RunSettings, preprocess_dir: str) -> str:
    """Checks the run's data against the previous good run; returns ``preprocess_dir`` once it passed."""
    from pipelines.statistics import previous_statistics, validate

    validate(s.config(), preprocess_dir, s.stage("statistics"), previous_statistics(s.data_root, s.run_dir), s.version)
    return preprocess_dir


def train(s: RunSettings, preprocess_dir: str) -> str:
    from trainer.train import train as run_train

    out = s.stage("model")
    run_train(s.config(), preprocess_dir, out, s.model_version, s.run_id)
    return out


def evaluate(s: RunSettings, model_dir: str, preprocess_dir: str) -> str:
    """Evaluates, records metrics (file + Elasticsearch), applies the blessing gate.

    Returns the evaluation folder; its ``blessing.json`` names the model to serve.
    """
    from trainer.evaluate import bless, evaluate_model

    cfg = s.config()
    out = s.stage("evaluation")
    metrics = evaluate_model(cfg, model_dir, preprocess_dir)
    metrics.update({"run_id": s.run_id, "model_type": cfg.model.type})
    with storage.atomic_stage(out) as tmp:
        storage.write_json(storage.join(tmp, "metrics.json"), metrics)
    decision = bless(metrics, cfg.model.blessing_metric, storage.join(s.data_root, "models", "blessed.json"), model_dir, s.force_publish)
    storage.write_json(storage.join(out, "blessing.json"), decision)
    es = s.es.client()
    es.index(index=METRICS_INDEX, id=s.model_version, document={**metrics, "blessing": decision}, refresh=True)
    return out


def serving_model_dir(evaluation_dir: str) -> str:
    """The blessed model to predict with: this run's if it passed the gate, else the current one."""
    decision = storage.read_json(storage.join(evaluation_dir, "blessing.json"))
    if decision["blessed"]:
        return decision["model_dir"]
    return decision["previous"]["model_dir"]


def predict(s: RunSettings, evaluation_dir: str, preprocess_dir: str) -> str:
    from trainer.predict import predict_all

    out = s.stage("predict")
    predict_all(s.config(), serving_model_dir(evaluation_dir), preprocess_dir, out)
    return out


def neighbours(s: RunSettings, preprocess_dir: str, predict_dir: str) -> str:
    from pipelines.neighbours import compute_neighbours

    cfg = s.config()
    out = s.stage("neighbours")
    compute_neighbours(cfg.neighbours, cfg.labels.ground_truth_field, preprocess_dir, predict_dir, out, s.beam_args)
    return out


def prediction_messages(predict_dir: str, run_id: str, version: int) -> Iterator[dict]:
    """One update message per predicted product."""
    from pipelines.publish import message
    from trainer.predict import read_predictions

    for p in read_predictions(predict_dir):
        body = {"categories": p["categories"], "attributes": p["attributes"]}
        yield message("predictions", p["id"], run_id, p["model_version"], version, body)


def neighbour_messages(neighbours_dir: str, run_id: str, version: int) -> Iterator[dict]:
    """One update message per product with neighbours."""
    from pipelines.neighbours import read_neighbours
    from pipelines.publish import message

    for n in read_neighbours(neighbours_dir):
        yield message("neighbours", n["id"], run_id, None, version, {"neighbours": n["neighbours"]})


def _publish(s: RunSettings, messages: Iterator[dict]) -> str:
    from pipelines.publish import KINDS, publish_parallel

    cfg = s.config()
    sent = publish_parallel(s.rabbit, cfg.publish.queue, cfg.publish.dead_letter_queue, messages, cfg.publish.workers)
    out = s.stage("publish")
    with storage.atomic_stage(out) as tmp:
        storage.write_json(storage.join(tmp, "summary.json"),
                           {**{k: sent[k] for k in KINDS}, "sent": sum(sent.values()), "version": s.version, "run_id": s.run_id})
    return out


def publish_predictions(s: RunSettings, predict_dir: str) -> str:
    return _publish(s, prediction_messages(predict_dir, s.run_id, s.version))


def publish_neighbours(s: RunSettings, neighbours_dir: str) -> str:
    return _publish(s, neighbour_messages(neighbours_dir, s.run_id, s.version))


VERSION_FIELDS = {"predictions": "prediction_version", "neighbours": "neighbours_version"}


def indexed_counts(s: RunSettings) -> dict:
    """Per kind: products holding this run's (or a newer run's) updates, and this run's dead letters."""
    from pipelines.consumer import DEAD_LETTER_INDEX

    es = s.es.client()
    es.indices.refresh(index=s.products_index)
    has_dead_letters = es.indices.exists(index=DEAD_LETTER_INDEX)
    if has_dead_letters:
        es.indices.refresh(index=DEAD_LETTER_INDEX)
    counts = {}
    for kind, field in VERSION_FIELDS.items():
        dead = 0
        if has_dead_letters:
            query = {"bool": {"filter": [{"term": {"run_id": s.run_id}}, {"term": {"kind": kind}}]}}
            dead = es.count(index=DEAD_LETTER_INDEX, query=query)["count"]
        indexed = es.count(index=s.products_index, query={"range": {field: {"gte": s.version}}})["count"]
        counts[kind] = {"indexed": indexed, "dead_lettered": dead}
    return counts


def wait_indexed(s: RunSettings, publish_dir: str, timeout_s: float = 1800, poll_s: float = 2.0) -> dict:
    """Blocks until every published update is in Elasticsearch or dead-lettered; returns the counts."""
    published = storage.read_json(storage.join(storage.require_complete(publish_dir), "summary.json"))
    deadline = time.monotonic() + timeout_s
    while True:
        counts = indexed_counts(s)
        missing = {k: published[k] - c["indexed"] - c["dead_lettered"] for k, c in counts.items()
                   if c["indexed"] + c["dead_lettered"] < published[k]}
        log.info("indexed %s of %s published", counts, published)
        if not missing:
            return {"published": published, "indexed": counts}
        if time.monotonic() > deadline:
            raise TimeoutError(f"{missing} updates still not indexed after {timeout_s}s: {counts}; is the consumer running?")
        time.sleep(poll_s)
