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
import time
import zlib
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
) -> int:
    """Publishes every message with a broker confirm; reconnects and resends on failure."""
    sent = 0
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
                sent += 1
                pending = None
        except RECOVERABLE as e:
            log.warning("publishing interrupted (%s); reconnecting", e)
        finally:
            if connection.is_open:
                try:
                    connection.close()
                except RECOVERABLE:
                    pass


def _worker(args) -> int:
    conn, queue, dlq, factory, shard, shards = args
    return publish_stream(conn, queue, dlq, (m for m in factory() if shard_of(m["id"], shards) == shard))


def publish_parallel(
    conn: RabbitConnection,
    queue: str,
    dead_letter_queue: str,
    message_factory: Callable[[], Iterator[dict]],
    workers: int,
) -> int:
    """Publishes ``message_factory()`` split by product-id hash over ``workers`` processes.

    Each worker re-reads the (cheap, local) message stream and sends its shard; the
    network round-trips for confirms are what the processes overlap.
    """
    if workers <= 1:
        return publish_stream(conn, queue, dead_letter_queue, message_factory())
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        return sum(pool.map(_worker, [(conn, queue, dead_letter_queue, message_factory, i, workers) for i in range(workers)]))


def queue_depths(conn: RabbitConnection, queues: List[str]) -> Dict[str, int]:
    """Ready-message counts (passive declare: never creates a queue)."""
    connection = conn.connect()
    try:
        channel = connection.channel()
        return {q: channel.queue_declare(queue=q, passive=True).method.message_count for q in queues}
    finally:
        connection.close()
