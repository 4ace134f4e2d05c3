"""The DAG's tasks as plain functions: explicit settings in, a run-scoped path out.

Every task reads only its run's folder (and the embedding cache), writes its stage
atomically, and can be rerun alone: a rerun replaces its stage and re-sends idempotent,
versioned updates. Airflow and the CLI are thin callers of these functions.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Optional, Tuple

from core import storage
from core.config import LOCAL_BEAM_RUNNER, FeatureConfig, load_config
from services.publish import RabbitConnection
from services.search_index import EsConnection

if TYPE_CHECKING:
    from pipelines.writeback import Target

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
    beam_args: Tuple[str, ...] = (f"--runner={LOCAL_BEAM_RUNNER}",)
    model_type: Optional[str] = None
    limit: Optional[int] = None
    categories: Tuple[str, ...] = ()
    force_publish: bool = False
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
    from pipelines.dump import dump_products, product_fields, product_query

    cfg = s.config()
    out = s.stage("dump")
    es = s.es.client()
    dump_products(
        es,
        s.products_index,
        s.categories_index,
        out,
        product_fields(cfg),
        slices=cfg.dump.slices,
        page_size=cfg.dump.page_size,
        limit=s.limit,
        query=product_query(cfg.labels.rule_field, s.categories),
    )
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
    from trainer.evaluate import SCORES_FILE, bless, evaluate_model

    cfg = s.config()
    out = s.stage("evaluation")
    with storage.atomic_stage(out) as tmp:
        metrics = evaluate_model(cfg, model_dir, preprocess_dir, scores_path=storage.join(tmp, SCORES_FILE))
        metrics.update({"run_id": s.run_id, "model_type": cfg.model.type})
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
    predict_all(s.config(), serving_model_dir(evaluation_dir), preprocess_dir, out, s.run_id)
    return out


def write_review(s: RunSettings, predict_dir: str) -> str:
    """Writes the run's review queue (``review.jsonl.gz`` of the predict stage) into the review
    index, one document per run and product; returns ``predict_dir``."""
    from pipelines.review import write_review as write

    write(s.es.client(), s.config().review.index, predict_dir)
    return predict_dir


def import_labels(s: RunSettings, csv_path: str) -> str:
    """Imports a CSV of human labels into the products index (partial updates of
    ``labels.human_field``); the counts and bad rows go to the run's ``import_labels`` stage,
    whose folder it returns."""
    from pipelines.dump import dump_tree
    from pipelines.human_labels import import_labels as run_import

    es = s.es.client()
    with storage.open_read(csv_path) as f:
        text = f.read().decode("utf-8-sig")
    summary = run_import(es, s.products_index, s.config().labels.human_field, text, dump_tree(es, s.categories_index))
    out = s.stage("import_labels")
    with storage.atomic_stage(out) as tmp:
        storage.write_json(storage.join(tmp, "summary.json"), {"csv_path": csv_path, **summary})
    return out


def neighbours(s: RunSettings, preprocess_dir: str, predict_dir: str) -> str:
    from pipelines.neighbours import compute_neighbours

    cfg = s.config()
    out = s.stage("neighbours")
    compute_neighbours(cfg.neighbours, cfg.labels.ground_truth_field, preprocess_dir, predict_dir, out, s.beam_args)
    return out


def report(s: RunSettings) -> str:
    """The run's HTML report from its finished stages (and, for a neighbours run, those of the
    categorisation run it used); returns the report file's path."""
    from pipelines.report.build import write_report

    return write_report(s.config(), s.run_dir, s.stage("report"))


def _target(
    s: RunSettings, kind: str, source_dir: str, unchanged: FrozenSet[str] = frozenset(), publication: Optional[str] = None
) -> Target:
    from pipelines.writeback import Target

    p = s.config().publish
    return Target(
        es=s.es.client(),
        rabbit=s.rabbit,
        index=s.products_index,
        queue=p.queue,
        dead_letter_queue=p.dead_letter_queue,
        kind=kind,
        source_dir=source_dir,
        run_id=s.run_id,
        version=s.version,
        publish_workers=p.workers,
        publish_batch_size=p.batch_size,
        unchanged=unchanged,
        publication=publication,
    )


def _publish(s: RunSettings, kind: str, source_dir: str) -> str:
    """Publishes the run's updates of ``kind``, but not those Elasticsearch already holds where the
    kind is in ``publish.skip_unchanged``; the stage folder names what ``wait_indexed`` reconciles
    (``summary.json``, and ``unchanged_ids.json``: the products left out).

    Each call is a new publication with its own id, carried by its messages into the documents: a
    rerun of the task sends the same run and version again, and only the publication id tells its
    writes from the earlier try's."""
    from pipelines.writeback import unchanged_ids
    from services.publish import publish_parallel

    target = _target(s, kind, storage.require_complete(source_dir), publication=uuid.uuid4().hex)
    unchanged = unchanged_ids(target) if kind in s.config().publish.skip_unchanged else set()
    messages = (m for m in target.messages() if m["id"] not in unchanged)
    sent = publish_parallel(s.rabbit, target.queue, target.dead_letter_queue, messages, target.publish_workers, target.publish_batch_size)
    log.info("%s: %d updates sent, %d left out as unchanged", kind, sent[kind], len(unchanged))
    out = s.stage("publish")
    with storage.atomic_stage(out) as tmp:
        storage.write_json(storage.join(tmp, "unchanged_ids.json"), sorted(unchanged))
        storage.write_json(
            storage.join(tmp, "summary.json"),
            {
                "kind": kind,
                "source_dir": source_dir,
                "sent": sent[kind],
                "unchanged": len(unchanged),
                "version": s.version,
                "run_id": s.run_id,
                "publication": target.publication,
            },
        )
    return out


def publish_predictions(s: RunSettings, predict_dir: str) -> str:
    return _publish(s, "predictions", predict_dir)


def publish_neighbours(s: RunSettings, neighbours_dir: str) -> str:
    return _publish(s, "neighbours", neighbours_dir)


def check_indexed(s: RunSettings, publish_dir: str, attempt_key: str) -> Tuple[Optional[str], Optional[float]]:
    """One check of the reconciler (see :mod:`pipelines.writeback`): its state lives in
    ``<run>/reconcile/<attempt_key>.json`` between checks, so that Airflow can run each check as a
    rescheduled poke; a new ``attempt_key`` (a new task try) starts afresh. Returns the ``indexed``
    stage folder once every update is written or dead-lettered (else None), and the seconds after
    which to check again where that is sooner than ``publish.reconcile_poke_s`` (else None)."""
    from pipelines.writeback import ReconcileState, check, sooner_check_s

    summary = storage.read_json(storage.join(storage.require_complete(publish_dir), "summary.json"))
    p = s.config().publish
    state_path = storage.join(s.run_dir, "reconcile", f"{attempt_key}.json")
    state = (
        ReconcileState.from_json(storage.read_json(state_path)) if storage.exists(state_path) else ReconcileState(published=summary["sent"])
    )
    unchanged = frozenset(storage.read_json(storage.join(publish_dir, "unchanged_ids.json")))
    target = _target(s, summary["kind"], summary["source_dir"], unchanged, summary.get("publication"))
    now = time.time()
    state = check(target, state, p.reconcile_stall_pokes, p.reconcile_attempts, now, p.reconcile_count_max_s)
    storage.write_json(state_path, state.to_json())
    if not state.finished:
        return None, sooner_check_s(state, now, p.reconcile_poke_s, p.reconcile_count_max_s)
    out = s.stage("indexed")
    with storage.atomic_stage(out) as tmp:
        storage.write_json(storage.join(tmp, "summary.json"), {"published": summary, **state.to_json()})
    return out, None


def wait_indexed(s: RunSettings, publish_dir: str) -> str:
    """Blocks until every published update is in Elasticsearch or dead-lettered, re-publishing what
    went missing (the CLI's form of the Airflow sensor); returns the ``indexed`` stage folder."""
    p = s.config().publish
    attempt_key = f"wait-{time.time_ns()}"  # a fresh reconciliation per call, as a new Airflow try gets
    deadline = time.monotonic() + p.reconcile_timeout_s
    while True:
        out, sooner_s = check_indexed(s, publish_dir, attempt_key)
        if out is not None:
            return out
        if time.monotonic() > deadline:
            raise TimeoutError(f"updates still not indexed after {p.reconcile_timeout_s}s; is the consumer running?")
        time.sleep(sooner_s or p.reconcile_poke_s)


def replay_dead_letters(s: RunSettings, run_id: Optional[str] = None, reason_contains: Optional[str] = None) -> dict:
    """Re-publishes the dead letters that match to the update queue (after a fix); the rest stay."""
    from pipelines.writeback import replay_dead_letters as replay

    p = s.config().publish
    return replay(s.rabbit, p.queue, p.dead_letter_queue, run_id=run_id, reason_contains=reason_contains, batch_size=p.batch_size)


TASKS: Dict[str, Callable[..., Any]] = {
    "dump": dump,
    "preprocess": preprocess,
    "validate_statistics": validate_statistics,
    "train": train,
    "evaluate": evaluate,
    "predict": predict,
    "write_review": write_review,
    "import_labels": import_labels,
    "publish_predictions": publish_predictions,
    "neighbours": neighbours,
    "publish_neighbours": publish_neighbours,
    "wait_indexed": wait_indexed,
    "report": report,
}
"""The stages by the names the DAGs (:func:`entrypoints.airflow_entry.run_task`) and the CLI
(``prodcat stage NAME``) use; each takes the :class:`RunSettings` and its input folders."""
