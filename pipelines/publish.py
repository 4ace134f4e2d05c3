"""Publishing updates to RabbitMQ: durable queues, persistent messages, publisher confirms,
parallel workers and reconnect with backoff.

Two kinds of versioned JSON messages, each a partial update of its own fields, so that
predictions and neighbours never need joining in memory:

    {"schema_version": 1, "kind": "predictions" | "neighbours", "id": ..., "run_id": ...,
     "model_version": ..., "version": <int, newer wins>, "body": {...}}
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import queue as queue_module
import time
import zlib
from collections import Counter
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import pika
import pika.exceptions

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KINDS = ("predictions", "neighbours")
RECOVERABLE = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ChannelClosed,
    pika.exceptions.StreamLostError,
    pika.exceptions.ChannelWrongStateError,
    ConnectionError,
)


@dataclasses.dataclass(frozen=True)
class RabbitConnection:
    """Where RabbitMQ is; filled from an Airflow connection or CLI flags."""

    host: str = "127.0.0.1"
    port: int = 5672
    username: str = "guest"
    password: str = dataclasses.field(default="guest", repr=False)
    virtual_host: str = "/"

    def parameters(self) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.virtual_host,
            credentials=pika.PlainCredentials(self.username, self.password),
            heartbeat=60,
            blocked_connection_timeout=300,
            connection_attempts=1,
        )

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self.parameters())


def declare_queues(channel, queue: str, dead_letter_queue: str) -> None:
    """Idempotent declaration of the durable update queue and its dead-letter queue."""
    channel.queue_declare(queue=dead_letter_queue, durable=True)
    channel.queue_declare(queue=queue, durable=True)


def message(kind: str, product_id: str, run_id: str, model_version: str, version: int, body: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "id": product_id,
        "run_id": run_id,
        "model_version": model_version,
        "version": version,
        "body": body,
    }


def shard_of(product_id: str, shards: int) -> int:
    return zlib.crc32(product_id.encode("utf-8")) % shards


def connect_with_backoff(conn: RabbitConnection, max_wait_s: float = 120.0) -> pika.BlockingConnection:
    delay, waited = 0.5, 0.0
    while True:
        try:
            return conn.connect()
        except RECOVERABLE as e:
            if waited >= max_wait_s:
                raise
            log.warning("RabbitMQ unreachable (%s); retrying in %.1fs", e, delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 10.0)


def publish_stream(
    conn: RabbitConnection,
    queue: str,
    dead_letter_queue: str,
    messages: Iterable[dict],
    max_wait_s: float = 120.0,
) -> Counter:
    """Publishes every message with a broker confirm; reconnects and resends on failure.
    Returns the counts sent per message kind."""
    sent: Counter = Counter()
    pending: Optional[dict] = None
    iterator = iter(messages)
    while True:
        connection = connect_with_backoff(conn, max_wait_s)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            declare_queues(channel, queue, dead_letter_queue)
            while True:
                if pending is None:
                    pending = next(iterator, None)
                    if pending is None:
                        return sent
                channel.basic_publish(
                    exchange="",
                    routing_key=queue,
                    body=json.dumps(pending, sort_keys=True).encode("utf-8"),
                    properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json"),
                    mandatory=True,
                )
                sent[pending["kind"]] += 1
                pending = None
        except RECOVERABLE as e:
            log.warning("publishing interrupted (%s); reconnecting", e)
        finally:
            if connection.is_open:
                try:
                    connection.close()
                except RECOVERABLE:
                    pass


_BATCH = 500
_DONE = None


def _queued(inbox) -> Iterator[dict]:
    while True:
        batch = inbox.get()
        if batch is _DONE:
            return
        yield from batch


def _hand_over(inbox, item, proc) -> None:
    """A bounded put that notices a dead worker instead of blocking forever."""
    while True:
        try:
            inbox.put(item, timeout=5)
            return
        except queue_module.Full:
            if not proc.is_alive():
                raise RuntimeError(f"publisher worker exited with {proc.exitcode}")


def _worker(conn: RabbitConnection, queue: str, dead_letter_queue: str, inbox, results) -> None:
    results.put(dict(publish_stream(conn, queue, dead_letter_queue, _queued(inbox))))


def publish_parallel(
    conn: RabbitConnection,
    queue: str,
    dead_letter_queue: str,
    messages: Iterable[dict],
    workers: int,
) -> Counter:
    """Publishes ``messages`` over ``workers`` processes, split by product-id hash (so one product's
    updates keep their order); returns the counts sent per kind.

    The stream is read once, here, and handed out in bounded batches: memory stays flat and the
    workers overlap the network round-trips that confirms cost.
    """
    if workers <= 1:
        return publish_stream(conn, queue, dead_letter_queue, messages)
    ctx = multiprocessing.get_context("spawn")
    inboxes = [ctx.Queue(maxsize=4) for _ in range(workers)]
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(conn, queue, dead_letter_queue, inbox, results), daemon=True) for inbox in inboxes]
    for proc in procs:
        proc.start()
    batches: List[List[dict]] = [[] for _ in range(workers)]
    for m in messages:
        shard = shard_of(m["id"], workers)
        batches[shard].append(m)
        if len(batches[shard]) >= _BATCH:
            _hand_over(inboxes[shard], batches[shard], procs[shard])
            batches[shard] = []
    for inbox, batch, proc in zip(inboxes, batches, procs):
        if batch:
            _hand_over(inbox, batch, proc)
        _hand_over(inbox, _DONE, proc)
    sent: Counter = Counter()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"publisher worker exited with {proc.exitcode}")
    for _ in procs:
        sent.update(results.get(timeout=5))
    return sent


def queue_depths(conn: RabbitConnection, queues: List[str]) -> Dict[str, int]:
    """Ready-message counts (passive declare: never creates a queue)."""
    connection = conn.connect()
    try:
        channel = connection.channel()
        return {q: channel.queue_declare(queue=q, passive=True).method.message_count for q in queues}
    finally:
        connection.close()
