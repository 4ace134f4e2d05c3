"""Write-back under combined faults, as issue 13 found it losing updates: a consumer at a low rate
limit started while the run is still publishing, ``kill -9`` of that consumer and a new one, a broker
restart, the Elasticsearch stand-in stopped for a while, then poison messages; then the run's
reconciler (``wait_indexed``), and a replay of an older version of every update.

Run by ``tests/test_writeback_chaos.py`` (a few thousand updates) and by ``benchmarks/publish.py``
(``--chaos-updates``, 8,918 and more), against the real RabbitMQ and the stand-in.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import pika
import yaml
from elasticsearch import Elasticsearch, helpers

from core import storage
from core.config import Publish
from pipelines.writeback import ReconcileState, Target, check, ready_messages, update_messages
from services.consumer import DEAD_LETTER_INDEX
from services.publish import RabbitConnection, declare_queues, message, publish_parallel
from services.search_index import PRODUCT_MAPPINGS, recreate_index
from trainer.predict import PREDICTIONS_FILE

REPO = Path(__file__).resolve().parents[1]
OLD, NEW = 1, 2  # update versions: the previous run's and this run's


@dataclasses.dataclass(frozen=True)
class Faults:
    """Seconds after publishing starts."""

    kill_consumer_at: float = 8.0
    broker_restart_at: float = 14.0
    broker_down_s: float = 4.0
    es_stop_at: float = 30.0
    es_down_s: float = 10.0
    rate_limit: float = 250.0

    def describe(self) -> List[str]:
        return [
            f"consumer at --rate-limit {self.rate_limit:g} started while publishing",
            f"kill -9 of the consumer at {self.kill_consumer_at:g} s, a new one started",
            f"broker restart (rabbitmqctl stop_app/start_app, {self.broker_down_s:g} s down) at {self.broker_restart_at:g} s",
            f"Elasticsearch stand-in stopped (noida-db down) at {self.es_stop_at:g} s for {self.es_down_s:g} s",
            "5 poison messages",
            "replay of the previous version of every update",
        ]


def write_predictions(predict_dir: str, n: int) -> None:
    """A run's predict folder as the predict stage writes it, for products ``0 .. n-1``."""
    with storage.atomic_stage(predict_dir) as tmp:
        with storage.open_write(storage.join(tmp, PREDICTIONS_FILE)) as raw, gzip.GzipFile(fileobj=raw, mode="wb") as f:
            for i in range(n):
                record = {
                    "id": str(i),
                    "model_version": "model-new",
                    "path": ["Apparel"],
                    "attributes": {},
                    "categories": [{"id": "Apparel", "name": "Apparel", "level": 1, "score": 0.9, "confident": True}],
                    "decided_by": "model",
                    "fewshot": None,
                }
                f.write(json.dumps(record).encode("utf-8") + b"\n")


def poison_messages(marker: str) -> List[bytes]:
    """Five messages that can never be applied, each carrying ``marker`` so that its dead letter can be found."""
    good = message("predictions", "0", marker, "m", NEW, {"categories": [], "attributes": {}})
    return [
        f"{{not json {marker}".encode(),
        json.dumps({**good, "schema_version": 99}).encode(),
        json.dumps({**good, "body": {}}).encode(),
        json.dumps({**good, "version": "two"}).encode(),
        json.dumps({**good, "id": f"no-such-product-{marker}"}).encode(),
    ]


def _consumer(es_url: str, rabbit: RabbitConnection, config: Path, index: str, rate_limit: float, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "entrypoints.cli",
            "--es-url",
            es_url,
            "--rabbit-vhost",
            rabbit.virtual_host,
            "--config",
            str(config),
            "--products-index",
            index,
            "consume",
            "--rate-limit",
            str(rate_limit),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("ab"),
    )


def _wait(check_done: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check_done():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def run_chaos(
    es: Elasticsearch,
    es_url: str,
    stop_es: Callable[[], None],
    start_es: Callable[[], None],
    rabbit: RabbitConnection,
    work_dir: Path,
    updates: int,
    unique: str,
    faults: Faults = Faults(),
) -> Dict:
    """Runs the sequence and returns what the issue asks to report: lost updates, older versions
    written over newer ones, dead-lettered poison messages, and the reconciler's re-publications."""
    index, queue, dlq = f"chaos-products-{unique}", f"chaos-{unique}", f"chaos-dead-{unique}"
    raw = yaml.safe_load((REPO / "feature_config.yaml").read_text())
    raw["publish"].update(queue=queue, dead_letter_queue=dlq)
    config = work_dir / "feature_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    log_path = work_dir / "consumers.log"
    recreate_index(es, index, PRODUCT_MAPPINGS)
    helpers.bulk(
        es,
        (
            {"_index": index, "_id": str(i), "_source": {"id": str(i), "title": f"product {i}", "prediction_version": OLD}}
            for i in range(updates)
        ),
        chunk_size=5000,
        refresh=True,
    )
    predict_dir = str(work_dir / "predict")
    write_predictions(predict_dir, updates)
    target = Target(
        es=es,
        rabbit=rabbit,
        index=index,
        queue=queue,
        dead_letter_queue=dlq,
        kind="predictions",
        source_dir=predict_dir,
        run_id=unique,
        version=NEW,
    )
    connection = rabbit.connect()
    declare_queues(connection.channel(), queue, dlq)
    connection.close()

    consumers = [_consumer(es_url, rabbit, config, index, faults.rate_limit, log_path)]
    started = time.monotonic()
    publisher = threading.Thread(
        target=publish_parallel, args=(rabbit, queue, dlq, update_messages("predictions", predict_dir, unique, NEW), 2)
    )
    publisher.start()
    try:

        def at(second: float) -> None:
            time.sleep(max(0.0, started + second - time.monotonic()))

        at(faults.kill_consumer_at)
        consumers[-1].kill()
        consumers[-1].wait()
        consumers.append(_consumer(es_url, rabbit, config, index, faults.rate_limit, log_path))
        at(faults.broker_restart_at)
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, stdout=subprocess.DEVNULL)
        time.sleep(faults.broker_down_s)
        subprocess.run(["rabbitmqctl", "start_app"], check=True, stdout=subprocess.DEVNULL)
        at(faults.es_stop_at)
        stop_es()
        time.sleep(faults.es_down_s)
        start_es()
        _wait(es.ping, 60, "Elasticsearch stand-in did not come back")
        publisher.join()
        poison = poison_messages(unique)
        connection = rabbit.connect()
        channel = connection.channel()
        for body in poison:
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))
        connection.close()

        state = ReconcileState(published=updates)
        while not state.finished:  # wait_indexed, checking every second
            state = check(target, state, stall_checks=3, max_attempts=3, now=time.time(), max_between_s=Publish().reconcile_count_max_s)
            time.sleep(1.0)
        reconciled_s = time.monotonic() - started

        older = (m for m in update_messages("predictions", predict_dir, unique, OLD))
        publish_parallel(rabbit, queue, dlq, older, 2)
        _wait(lambda: ready_messages(rabbit, queue) == 0, 300, "the replay of old versions was not consumed")
    finally:
        for proc in consumers:  # SIGTERM: the consumer writes and acks what it holds, then exits
            proc.terminate()
        for proc in consumers:
            proc.wait(timeout=120)

    es.indices.refresh(index=index)
    versions = {
        h["_id"]: h["_source"].get("prediction_version")
        for h in helpers.scan(es, index=index, query={"query": {"match_all": {}}, "_source": ["prediction_version"]})
    }
    connection = rabbit.connect()
    channel = connection.channel()
    dead_letters = []
    while True:
        method, props, body = channel.basic_get(dlq, auto_ack=True)
        if method is None:
            break
        dead_letters.append({"reason": json.loads(body)["reason"], "header": (props.headers or {}).get("x-prodcat-reason", "")})
    channel.queue_delete(queue)
    channel.queue_delete(dlq)
    connection.close()
    es.indices.refresh(index=DEAD_LETTER_INDEX)
    ours = {"bool": {"should": [{"term": {"run_id": unique}}, {"bool": {"must_not": {"exists": {"field": "run_id"}}}}]}}
    indexed_dead = [
        h["_source"]["reason"] for h in helpers.scan(es, index=DEAD_LETTER_INDEX, query={"query": ours}) if unique in h["_source"]["body"]
    ]
    es.indices.delete(index=index)
    return {
        "updates": updates,
        "lost": sum(v is None or v < NEW for v in versions.values()),
        "older_overwrote_newer": sum(v == OLD for v in versions.values()),
        "poison": len(poison),
        "dead_letter_queue": dead_letters,
        "dead_letter_index": indexed_dead,
        "faults": faults.describe(),
        "reconciled": sum(a["republished"] for a in state.attempts),
        "reconcile_attempts": state.attempts,
        "seconds_to_reconciled": round(reconciled_s, 1),
    }
