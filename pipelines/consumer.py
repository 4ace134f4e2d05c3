"""The consumer: RabbitMQ update messages -> Elasticsearch bulk partial updates, losing nothing.

- prefetch-bounded, flushes a bulk request by size or time, at most ``rate_limit`` docs/s;
- a message is acked only after Elasticsearch accepted its item (or it was dead-lettered);
- 429/5xx items and an unreachable cluster are retried with backoff, indefinitely;
- a version conflict counts as applied; 400/404 items and poison messages go to the
  dead-letter queue with the reason (and into a dead-letter index, for counting);
- every update is a script that keeps the newest version: replays and older models'
  messages arriving late are no-ops;
- SIGTERM: stop taking messages, flush, ack, exit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from typing import Any, Dict, List, Optional, Tuple

import pika
from elasticsearch import ApiError, Elasticsearch
from elasticsearch import ConnectionError as EsConnectionError
from elasticsearch import ConnectionTimeout

from pipelines.publish import KINDS, RECOVERABLE, SCHEMA_VERSION, RabbitConnection, connect_with_backoff, declare_queues
from pipelines.search_index import DEAD_LETTER_MAPPINGS, ensure_index

log = logging.getLogger(__name__)

DEAD_LETTER_INDEX = "prodcat-dead-letters"
RETRYABLE_STATUS = {429, 500, 502, 503, 504}

# Field names per message kind: (version field, run field, {body key -> document field}).
FIELDS = {
    "predictions": ("prediction_version", "prodcat_run_id", {"categories": "predicted_categories", "attributes": "predicted_attributes"}),
    "neighbours": ("neighbours_version", "neighbours_run_id", {"neighbours": "visual_neighbours"}),
}


def _script(kind: str) -> str:
    """The painless update of one message kind: apply unless the document holds a newer version."""
    version_field, run_field, mapping = FIELDS[kind]
    sets = [f"ctx._source.{field} = params.{field};" for field in mapping.values()]
    sets += [f"ctx._source.{version_field} = params.version;", f"ctx._source.{run_field} = params.run_id;"]
    if kind == "predictions":
        sets.append("ctx._source.model_version = params.model_version;")
    return (
        f"if (ctx._source.{version_field} != null && ctx._source.{version_field} > params.version) "
        f"{{ ctx.op = 'noop' }} else {{ {' '.join(sets)} }}"
    )


SCRIPTS = {kind: _script(kind) for kind in FIELDS}


class PoisonMessage(ValueError):
    """A message that can never be applied; the text is the dead-letter reason."""


def parse_message(body: bytes) -> dict:
    """Validates one message; raises :class:`PoisonMessage` with the reason."""
    try:
        msg = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PoisonMessage(f"invalid_json: {e}") from e
    if not isinstance(msg, dict):
        raise PoisonMessage("invalid_schema: not an object")
    if msg.get("schema_version") != SCHEMA_VERSION:
        raise PoisonMessage(f"unsupported_schema_version: {msg.get('schema_version')!r}")
    if msg.get("kind") not in KINDS:
        raise PoisonMessage(f"invalid_schema: kind must be one of {list(KINDS)}")
    for key, kind in (("id", str), ("run_id", str), ("version", int), ("body", dict)):
        if not isinstance(msg.get(key), kind) or isinstance(msg.get(key), bool):
            raise PoisonMessage(f"invalid_schema: {key} must be {kind.__name__}")
    missing = set(FIELDS[msg["kind"]][2]) - set(msg["body"])
    if missing:
        raise PoisonMessage(f"invalid_schema: body lacks {sorted(missing)}")
    return msg


def update_action(index: str, msg: dict) -> Tuple[dict, dict]:
    mapping = FIELDS[msg["kind"]][2]
    params = {"version": msg["version"], "run_id": msg["run_id"], "model_version": msg.get("model_version")}
    params.update({field: msg["body"][key] for key, field in mapping.items()})
    return {"update": {"_index": index, "_id": msg["id"], "retry_on_conflict": 3}}, {
        "script": {"source": SCRIPTS[msg["kind"]], "lang": "painless", "params": params}
    }


class RateLimiter:
    """Token bucket: ``acquire(n)`` blocks until ``n`` documents may go out."""

    def __init__(self, per_second: float, clock=time.monotonic, sleep=time.sleep):
        self.rate = per_second
        self.capacity = max(per_second, 1.0)
        self.tokens = self.capacity
        self.clock, self.sleep = clock, sleep
        self.last = clock()

    def acquire(self, n: int) -> None:
        if self.rate <= 0:
            return
        while True:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= min(n, self.capacity):
                self.tokens -= n
                return
            self.sleep((min(n, self.capacity) - self.tokens) / self.rate)


@dataclasses.dataclass
class Pending:
    delivery_tag: int
    body: bytes
    msg: Optional[dict] = None


@dataclasses.dataclass
class ConsumerSettings:
    queue: str
    dead_letter_queue: str
    index: str
    bulk_size: int = 500
    flush_s: float = 2.0
    rate_limit_docs_per_s: float = 2000.0
    prefetch: int = 1000
    max_backoff_s: float = 30.0
    idle_exit_s: Optional[float] = None  # for one-shot runs: exit when the queue stays empty this long


class Consumer:
    def __init__(self, rabbit: RabbitConnection, es: Elasticsearch, settings: ConsumerSettings):
        self.rabbit, self.es, self.s = rabbit, es, settings
        self.limiter = RateLimiter(settings.rate_limit_docs_per_s)
        self.stopping = False
        self.buffer: List[Pending] = []
        self.stats = {"applied": 0, "noop": 0, "dead_lettered": 0, "retried": 0}

    def request_stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self) -> Dict[str, int]:
        """Consumes until SIGTERM/SIGINT (or ``idle_exit_s`` of silence); reconnects on failure."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self._with_es_retry(lambda: ensure_index(self.es, DEAD_LETTER_INDEX, DEAD_LETTER_MAPPINGS))
        while not self.stopping:
            connection = connect_with_backoff(self.rabbit, max_wait_s=float("inf"))
            try:
                self._consume(connection)
            except RECOVERABLE as e:
                log.warning("RabbitMQ connection lost (%s); unacked messages will be redelivered", e)
                self.buffer.clear()
            finally:
                if connection.is_open:
                    connection.close()
        return self.stats

    def _consume(self, connection: pika.BlockingConnection) -> None:
        channel = connection.channel()
        channel.confirm_delivery()
        declare_queues(channel, self.s.queue, self.s.dead_letter_queue)
        channel.basic_qos(prefetch_count=self.s.prefetch)
        last_flush = last_message = time.monotonic()

        def on_message(ch, method, properties, body):
            nonlocal last_message
            self.buffer.append(Pending(method.delivery_tag, body))
            last_message = time.monotonic()

        tag = channel.basic_consume(queue=self.s.queue, on_message_callback=on_message)
        while not self.stopping:
            connection.process_data_events(time_limit=0.1)
            now = time.monotonic()
            if len(self.buffer) >= self.s.bulk_size or (self.buffer and now - last_flush >= self.s.flush_s):
                self._flush(channel)
                last_flush = now
            if self.s.idle_exit_s is not None and not self.buffer and now - last_message >= self.s.idle_exit_s:
                self.stopping = True
        channel.basic_cancel(tag)
        connection.process_data_events(time_limit=0)
        self._flush(channel)

    def _dead_letter(self, channel, item: Pending, reason: str) -> None:
        record = {"reason": reason, "body": item.body.decode("utf-8", errors="replace")[:10000]}
        if item.msg is not None:
            record.update({"id": item.msg["id"], "run_id": item.msg["run_id"], "kind": item.msg["kind"]})
        channel.basic_publish(
            exchange="",
            routing_key=self.s.dead_letter_queue,
            body=json.dumps(record).encode("utf-8"),
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, headers={"x-prodcat-reason": reason[:200]}),
        )
        self._with_es_retry(lambda: self.es.index(index=DEAD_LETTER_INDEX, document=record))
        self.stats["dead_lettered"] += 1

    def _with_es_retry(self, call):
        delay = 0.5
        while True:
            try:
                return call()
            except (EsConnectionError, ConnectionTimeout) as e:
                log.warning("Elasticsearch unavailable (%s); backing off %.1fs", e, delay)
            except ApiError as e:
                if e.meta.status not in RETRYABLE_STATUS:
                    raise
                log.warning("Elasticsearch answered %s; backing off %.1fs", e.meta.status, delay)
            time.sleep(delay)
            delay = min(delay * 2, self.s.max_backoff_s)

    def _flush(self, channel) -> None:
        """Sends the buffer in bulk requests of at most ``bulk_size`` docs (and one second's worth of the
        rate limit), so that a full prefetch window never reaches the cluster as one request."""
        batch, self.buffer = self.buffer, []
        chunk = self.s.bulk_size
        if self.s.rate_limit_docs_per_s > 0:
            chunk = max(1, min(chunk, int(self.s.rate_limit_docs_per_s)))
        for start in range(0, len(batch), chunk):
            self._send(channel, batch[start:start + chunk])

    def _send(self, channel, batch: List[Pending]) -> None:
        """Sends one bulk request (retrying 429/5xx items) until every item is applied or dead-lettered."""
        todo: List[Pending] = []
        for item in batch:
            try:
                item.msg = parse_message(item.body)
                todo.append(item)
            except PoisonMessage as e:
                self._dead_letter(channel, item, str(e))
                channel.basic_ack(item.delivery_tag)
        delay = 0.5
        while todo:
            self.limiter.acquire(len(todo))
            operations: List[dict] = []
            for item in todo:
                operations.extend(update_action(self.s.index, item.msg))
            response = self._with_es_retry(lambda: self.es.bulk(operations=operations))
            retry: List[Pending] = []
            for item, result in zip(todo, response["items"]):
                outcome = result["update"]
                status = outcome.get("status", 500)
                if status < 300 or status == 409:
                    self.stats["noop" if outcome.get("result") == "noop" else "applied"] += 1
                    channel.basic_ack(item.delivery_tag)
                elif status in RETRYABLE_STATUS:
                    retry.append(item)
                else:
                    error = outcome.get("error") or {}
                    self._dead_letter(channel, item, f"http_{status}: {error.get('type')}: {error.get('reason')}")
                    channel.basic_ack(item.delivery_tag)
            todo = retry
            if retry:
                self.stats["retried"] += len(retry)
                log.warning("%d items rejected with 429/5xx; retrying in %.1fs", len(retry), delay)
                time.sleep(delay)
                delay = min(delay * 2, self.s.max_backoff_s)
