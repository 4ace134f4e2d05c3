"""Publishing updates to RabbitMQ: durable queues, persistent messages committed in batches,
parallel workers and reconnect with backoff.

Two kinds of versioned JSON messages, each a partial update of its own fields, so that
predictions and neighbours never need joining in memory:

    {"schema_version": 1, "kind": "predictions" | "neighbours", "id": ..., "run_id": ...,
     "model_version": ..., "version": <int, newer wins>, "body": {...}}
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue as queue_module
import zlib
from collections import Counter
from typing import Iterable, Iterator, List, Optional

import orjson
import pika
import pika.exceptions
import tenacity

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
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


def message(
    kind: str, product_id: str, run_id: str, model_version: str, version: int, body: dict, publication: Optional[str] = None
) -> dict:
    """One update message. ``publication`` names the publish that sent it (one task try), so that a
    rerun's reconciler can tell its own writes from an earlier try's of the same run and version."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "id": product_id,
        "run_id": run_id,
        "model_version": model_version,
        "version": version,
        "publication": publication,
        "body": body,
    }


def shard_of(product_id: str, shards: int) -> int:
    return zlib.crc32(product_id.encode("utf-8")) % shards


def connect_with_backoff(conn: RabbitConnection, max_wait_s: float = 120.0) -> pika.BlockingConnection:
    """A connection, retried with exponential backoff for up to ``max_wait_s`` (inf: forever)."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(RECOVERABLE),
        wait=tenacity.wait_exponential(multiplier=0.5, max=10.0),
        stop=tenacity.stop_after_delay(max_wait_s) if max_wait_s != float("inf") else tenacity.stop_never,
        before_sleep=lambda state: log.warning("RabbitMQ unreachable (%s); retrying", state.outcome.exception()),
        reraise=True,
    )
    return retrying(conn.connect)


def _publish_batch(channel, queue: str, batch: List[dict]) -> None:
    """One AMQP transaction: when ``tx_commit`` returns, the broker holds every message of the batch
    (persistent messages, durable queue); if the connection drops before, it holds none of them.
    pika's BlockingChannel waits for a publisher confirm per message (a round trip each); a commit per
    batch gives the same guarantee with one round trip per ``len(batch)`` messages."""
    properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json")
    for m in batch:
        channel.basic_publish(exchange="", routing_key=queue, body=orjson.dumps(m, option=orjson.OPT_SORT_KEYS), properties=properties)
    channel.tx_commit()


def publish_stream(
    conn: RabbitConnection,
    queue: str,
    dead_letter_queue: str,
    messages: Iterable[dict],
    batch_size: int = 500,
    max_wait_s: float = 120.0,
) -> Counter:
    """Publishes every message in committed batches of ``batch_size``; on a lost connection it
    reconnects and resends the uncommitted batch (a resent message is harmless: updates are
    versioned). Returns the counts sent per message kind."""
    sent: Counter = Counter()
    batches = _batched(messages, batch_size)
    batch = next(batches, None)
    while batch is not None:
        connection = connect_with_backoff(conn, max_wait_s)
        try:
            channel = connection.channel()
            declare_queues(channel, queue, dead_letter_queue)
            channel.tx_select()
            while batch is not None:
                _publish_batch(channel, queue, batch)
                sent.update(m["kind"] for m in batch)
                batch = next(batches, None)
        except RECOVERABLE as e:
            log.warning("publishing interrupted (%s); reconnecting and resending %d messages", e, len(batch or []))
        finally:
            if connection.is_open:
                try:
                    connection.close()
                except RECOVERABLE:
                    pass
    return sent


def _batched(messages: Iterable[dict], size: int) -> Iterator[List[dict]]:
    batch: List[dict] = []
    for m in messages:
        batch.append(m)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


_DONE = None


def _queued(inbox: queue_module.Queue) -> Iterator[dict]:
    while True:
        batch = inbox.get()
        if batch is _DONE:
            return
        yield from batch


def publish_parallel(
    conn: RabbitConnection,
    queue: str,
    dead_letter_queue: str,
    messages: Iterable[dict],
    workers: int,
    batch_size: int = 500,
) -> Counter:
    """Publishes ``messages`` over ``workers`` connections, split by product-id hash (so one
    product's updates keep their order); returns the counts sent per kind.

    The workers are threads, each with its own connection: publishing waits on the broker's commits,
    and unlike processes threads need nothing re-imported (a spawned child would re-run the Airflow
    task runner's ``__main__``). The stream is read once, here, and handed out in bounded batches, so
    memory stays flat.
    """
    if workers <= 1:
        return publish_stream(conn, queue, dead_letter_queue, messages, batch_size)
    inboxes = [queue_module.Queue(maxsize=4) for _ in range(workers)]
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="publish") as pool:
        futures = [pool.submit(publish_stream, conn, queue, dead_letter_queue, _queued(inbox), batch_size) for inbox in inboxes]

        def hand_over(shard: int, item: Optional[List[dict]]) -> None:
            while True:  # a bounded put that notices a failed worker instead of blocking forever
                try:
                    inboxes[shard].put(item, timeout=5)
                    return
                except queue_module.Full:
                    if futures[shard].done():
                        futures[shard].result()  # raises the worker's error
                        raise RuntimeError(f"publisher worker {shard} stopped early") from None

        batches: List[List[dict]] = [[] for _ in range(workers)]
        try:
            for m in messages:
                shard = shard_of(m["id"], workers)
                batches[shard].append(m)
                if len(batches[shard]) >= batch_size:
                    hand_over(shard, batches[shard])
                    batches[shard] = []
            for shard, batch in enumerate(batches):
                if batch:
                    hand_over(shard, batch)
        finally:  # every live worker gets its end marker, so the pool can shut down even after an error
            for shard in range(workers):
                while not futures[shard].done():
                    try:
                        inboxes[shard].put(_DONE, timeout=1)
                        break
                    except queue_module.Full:
                        pass
        sent: Counter = Counter()
        for future in futures:
            sent.update(future.result())
    return sent
