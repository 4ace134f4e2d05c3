"""Making sure a run's updates end up in Elasticsearch: the reconciler behind ``wait_indexed`` and
the dead-letter replay.

The consumer acknowledges a message only after Elasticsearch accepted its update, but an accepted
write can still be lost by the cluster (a node that dies before its translog is synced; the local
stand-in loses writes it accepted in the second before it is stopped). So the run itself checks the
outcome: when progress stalls with the queue empty, it compares the run's predictions/neighbours files
with what Elasticsearch holds and re-publishes exactly the updates that are missing, a bounded number
of times. Updates are versioned, so a re-published or replayed update never overwrites a newer one.

A run need not send what Elasticsearch already holds: :func:`unchanged_ids` names the products
whose document carries exactly what the run's update would write (most neighbour lists from one
week to the next; a product without a photo, which has none either way), and the reconciler then
waits only for the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any, Dict, FrozenSet, Iterator, List, Mapping, Optional, Set

import orjson
import pika
from elasticsearch import Elasticsearch, helpers

from services.consumer import DEAD_LETTER_INDEX, FIELDS, PUBLICATION_FIELDS, content_fields, document_content
from services.publish import RabbitConnection, declare_queues, message, publish_parallel

log = logging.getLogger(__name__)


class NotWritten(RuntimeError):
    """Updates that did not reach Elasticsearch after every re-publication."""

    def __init__(self, kind: str, ids: List[str], attempts: int):
        shown = ", ".join(sorted(ids)[:50]) + (" ..." if len(ids) > 50 else "")
        super().__init__(f"{len(ids)} {kind} updates still missing after {attempts} re-publications: {shown}")
        self.ids = ids


def update_messages(kind: str, source_dir: str, run_id: str, version: int, publication: Optional[str] = None) -> Iterator[dict]:
    """The update messages of a run's predictions or neighbours folder, one per product."""
    if kind == "predictions":
        from trainer.predict import read_predictions

        for p in read_predictions(source_dir):
            # predictions written before the few-shot classifier lack decided_by and fewshot
            body = {"categories": p["categories"], "attributes": p["attributes"], **{k: p.get(k) for k in ("decided_by", "fewshot")}}
            yield message("predictions", p["id"], run_id, p["model_version"], version, body, publication)
    else:
        from pipelines.neighbours import read_neighbours

        for n in read_neighbours(source_dir):
            yield message("neighbours", n["id"], run_id, None, version, {"neighbours": n["neighbours"]}, publication)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one kind of a run's updates go, and how to tell they arrived."""

    es: Elasticsearch
    rabbit: RabbitConnection
    index: str
    queue: str
    dead_letter_queue: str
    kind: str
    source_dir: str
    run_id: str
    version: int
    publish_workers: int = 2
    publish_batch_size: int = 500
    unchanged: FrozenSet[str] = frozenset()  # products left out of the publication: they hold the update already
    # The publish try that sent the updates: an earlier try of the same run wrote the same version, and
    # its documents must not count as this one's (None: any write of the version counts).
    publication: Optional[str] = None

    @property
    def version_field(self) -> str:
        return FIELDS[self.kind][0]

    @property
    def run_field(self) -> str:
        return FIELDS[self.kind][1]

    @property
    def publication_field(self) -> str:
        return PUBLICATION_FIELDS[self.kind]

    def messages(self) -> Iterator[dict]:
        return update_messages(self.kind, self.source_dir, self.run_id, self.version, self.publication)


def _written_query(target: Target) -> dict:
    if target.publication is None:
        return {"range": {target.version_field: {"gte": target.version}}}
    newer = {"range": {target.version_field: {"gt": target.version}}}
    return {"bool": {"should": [newer, {"term": {target.publication_field: target.publication}}], "minimum_should_match": 1}}


def _written_by_run_query(target: Target) -> dict:
    if target.publication is None:
        return {"term": {target.run_field: target.run_id}}
    return {"term": {target.publication_field: target.publication}}


def _dead_letter_query(target: Target) -> dict:
    terms = [{"term": {"run_id": target.run_id}}, {"term": {"kind": target.kind}}]
    if target.publication is not None:
        terms.append({"term": {"publication": target.publication}})
    return {"bool": {"filter": terms}}


def _refreshed(target: Target) -> bool:
    """Refreshes both indices; False where there is no dead-letter index yet."""
    target.es.indices.refresh(index=target.index)
    if not target.es.indices.exists(index=DEAD_LETTER_INDEX):
        return False
    target.es.indices.refresh(index=DEAD_LETTER_INDEX)
    return True


def progress(target: Target, refresh: bool = True) -> Dict[str, int]:
    """Counts (cheap, no ids): products holding this run's update of ``kind`` (or a newer run's), and
    this run's dead letters of ``kind``; without ``refresh``, as of the indices' last refresh."""
    has_dead_letters = _refreshed(target) if refresh else target.es.indices.exists(index=DEAD_LETTER_INDEX)
    dead = target.es.count(index=DEAD_LETTER_INDEX, query=_dead_letter_query(target))["count"] if has_dead_letters else 0
    return {"indexed": target.es.count(index=target.index, query=_written_query(target))["count"], "dead_lettered": dead}


def settled_ids(target: Target) -> Set[str]:
    """Products holding this run's update of ``kind`` (or a newer run's) or whose update of this run
    was dead-lettered."""
    has_dead_letters = _refreshed(target)
    ids = {
        hit["_id"]
        for hit in helpers.scan(target.es, index=target.index, size=5000, query={"query": _written_query(target), "_source": False})
    }
    if has_dead_letters:
        ids |= {
            hit["_source"]["id"]
            for hit in helpers.scan(target.es, index=DEAD_LETTER_INDEX, query={"query": _dead_letter_query(target), "_source": ["id"]})
        }
    return ids


def missing_ids(target: Target) -> Set[str]:
    """Products of the run's file whose update is neither in Elasticsearch nor dead-lettered (nor left
    out as unchanged)."""
    settled = settled_ids(target)
    return {m["id"] for m in target.messages()} - settled - target.unchanged


def _blank(value: Any) -> bool:
    return value is None or value == [] or value == {} or (isinstance(value, dict) and all(_blank(v) for v in value.values()))


def content_digest(content: Mapping[str, Any]) -> bytes:
    """A digest of a document's update content; an absent, null or empty field (an empty neighbour
    list included) counts as blank, so a document without neighbours equals an update with none."""
    normal = {field: None if _blank(value) else value for field, value in content.items()}
    return hashlib.blake2b(orjson.dumps(normal, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


def unchanged_ids(target: Target) -> Set[str]:
    """Products whose document already holds exactly the content of the run's update (whichever run
    wrote it). One scan of the documents an update of this kind ever wrote (those with its version
    field); the others hold none of its fields, so they hold what a blank update writes (no
    neighbours for a product without a photo). Digests, not values, are kept in memory."""
    fields = content_fields(target.kind)
    # Against scanning every document, on the stand-in with 35,528 products: 2.2 -> 1.1 s on a fresh
    # index, 3.7 / 4.1 -> 2.4 / 2.5 s with 7,580 neighbour lists written (the rest is the run's file).
    written = {"exists": {"field": target.version_field}}
    stored = {
        hit["_id"]: content_digest({f: hit.get("_source", {}).get(f) for f in fields})
        for hit in helpers.scan(target.es, index=target.index, size=5000, query={"query": written, "_source": list(fields)})
    }
    blank = content_digest(dict.fromkeys(fields))
    return {m["id"] for m in target.messages() if stored.get(m["id"], blank) == content_digest(document_content(m))}


def ready_messages(rabbit: RabbitConnection, queue: str) -> int:
    """Messages waiting in ``queue`` (a passive declare: never creates it)."""
    connection = rabbit.connect()
    try:
        return connection.channel().queue_declare(queue=queue, passive=True).method.message_count
    finally:
        connection.close()


def republish(target: Target, ids: Set[str]) -> int:
    """Publishes again exactly the run's updates of ``ids``; returns how many were sent."""
    messages = (m for m in target.messages() if m["id"] in ids)
    sent = publish_parallel(
        target.rabbit, target.queue, target.dead_letter_queue, messages, target.publish_workers, target.publish_batch_size
    )
    return sum(sent.values())


@dataclasses.dataclass
class ReconcileState:
    """What one check of ``wait_indexed`` hands the next (a file between Airflow's rescheduled pokes)."""

    published: int
    done: int = -1
    checked_at: float = 0.0  # when Elasticsearch was last counted: seconds since the epoch, the entry point's clock
    pace: float = 0.0  # updates/s written between the last two counts that saw progress (0: none yet)
    unchanged_checks: int = 0
    attempts: List[dict] = dataclasses.field(default_factory=list)
    finished: bool = False
    counts: Dict[str, int] = dataclasses.field(default_factory=dict)
    waiting: int = -1  # messages ready in the queue at the last count (-1: none yet)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict) -> ReconcileState:
        return cls(**value)


def next_count_at(state: ReconcileState, max_between_s: float) -> float:
    """When the next count in Elasticsearch is due: where the pace says the rest has arrived (1.2 times
    that estimate plus 0.5 s), and at the latest ``max_between_s`` after the last count."""
    latest = state.checked_at + max_between_s
    if state.pace <= 0:
        return latest
    return min(latest, state.checked_at + 1.2 * (state.published - state.done) / state.pace + 0.5)


def count_due(state: ReconcileState, waiting: int, now: float, max_between_s: float) -> bool:
    """Whether a check counts in Elasticsearch. A count is a query over the whole index; on the
    stand-in it takes about a second of the CPU that writes the updates, so two sensors counting every
    few seconds halved its write rate (measured). A check therefore skips the count while messages
    wait in the queue and the rest cannot have arrived: before the pace of the writes says it has or,
    with no pace yet, while more messages wait than updates remain (``waiting`` 0 where the queue
    cannot be read). Skipping never ends a wait; it can only end one later, by at most
    ``max_between_s`` plus a poke interval."""
    if state.done < 0 or waiting == 0 or now + 0.5 >= next_count_at(state, max_between_s):
        return True
    return state.pace <= 0 and waiting < state.published - state.done


def check(target: Target, state: ReconcileState, stall_checks: int, max_attempts: int, now: float, max_between_s: float) -> ReconcileState:
    """One check at ``now`` (seconds since the epoch): counts what arrived where a count is due
    (:func:`count_due`); once progress has stalled for ``stall_checks`` counts with the queue empty,
    re-publishes what is missing (at most ``max_attempts`` times, then raises :class:`NotWritten` with
    the ids). Sets ``finished`` when every update is written or dead-lettered."""
    try:
        waiting = ready_messages(target.rabbit, target.queue)
    except pika.exceptions.AMQPError as e:  # the queue cannot say: Elasticsearch still can
        log.warning("%s: could not read %s (%r); counting in Elasticsearch", target.kind, target.queue, e)
        waiting = 0
    if not count_due(state, waiting, now, max_between_s):
        return state
    waiting_before, state.waiting = state.waiting, waiting
    # A refresh costs the cluster (on the stand-in, seconds at 100k documents, while writes wait).
    # Counts without one can only be short of the truth (a written update stays written, or a newer
    # run's replaces it), so they may say complete on their own. A count that saw no progress is
    # taken again after a refresh only where it matters: the queue is empty (a stall may be called)
    # or this kind's writes were going on (a pace: the count may be stale). Not while its messages
    # still wait their turn behind another kind's: in the growth run that sensor's count every
    # reconcile_count_max_s added a refresh and a second count (about 2.5 s of the stand-in's CPU
    # at 106k documents) each time.
    state.counts = progress(target, refresh=False)
    done = state.counts["indexed"] + state.counts["dead_lettered"]
    if done == state.done and done < state.published and (not waiting or state.pace > 0):
        state.counts = progress(target)
        done = state.counts["indexed"] + state.counts["dead_lettered"]
    # A pace only from two counts with this kind's writes going on at the first: after a count that
    # saw none (its messages queued behind others), the span would hold idle time and say too slow.
    writing = state.done > 0 and state.unchanged_checks == 0 and done > state.done and now > state.checked_at
    state.pace = (done - state.done) / (now - state.checked_at) if writing else 0.0
    state.checked_at = now
    if done >= state.published:
        # Each sent update names a distinct product, so when as many documents carry the publication's
        # id none is missing; otherwise (a newer run overwrote some, some were dead-lettered) the counts
        # can include other products and the ids decide, at the cost of a scan.
        state.counts["written_by_run"] = target.es.count(index=target.index, query=_written_by_run_query(target))["count"]
        if state.counts["written_by_run"] >= state.published or not missing_ids(target):
            state.done, state.finished = done, True
            return state
    if done != state.done:
        state.done, state.unchanged_checks = done, 0
        log.info("%s: %d of %d updates written or dead-lettered; %d messages wait", target.kind, done, state.published, waiting)
        return state
    state.unchanged_checks += 1
    if state.unchanged_checks < stall_checks or waiting:
        if waiting and state.unchanged_checks >= stall_checks:
            # A queue that drains is being consumed: this kind's messages wait behind others (the
            # neighbours behind 106,584 predictions in the growth run, 15 minutes).
            drains = 0 <= waiting < waiting_before
            (log.info if drains else log.warning)(
                "%s: no progress at %d of %d while %d messages wait in %s (%s)",
                target.kind,
                done,
                state.published,
                waiting,
                target.queue,
                f"{waiting_before - waiting} taken since the last count"
                if drains
                else "none taken since the last count: is the consumer running?",
            )
        return state
    missing = missing_ids(target)
    if len(state.attempts) >= max_attempts:
        raise NotWritten(target.kind, sorted(missing), len(state.attempts))
    sent = republish(target, missing)
    state.attempts.append({"attempt": len(state.attempts) + 1, "missing": len(missing), "republished": sent})
    state.unchanged_checks = 0
    log.warning(
        "%s: progress stalled at %d of %d with the queue empty; re-published %d missing updates (attempt %d)",
        target.kind,
        done,
        state.published,
        sent,
        len(state.attempts),
    )
    return state


def sooner_check_s(state: ReconcileState, now: float, poke_s: float, max_between_s: float, min_s: float = 2.0) -> Optional[float]:
    """Seconds to the next check if sooner than ``poke_s``: where the next count is due within a poke
    interval (:func:`next_count_at`), a check then ends the wait near the last write instead of up
    to a whole interval later; else None."""
    if state.finished or state.pace <= 0:
        return None
    due = next_count_at(state, max_between_s) - now
    return max(min_s, due) if due < poke_s else None


def replay_dead_letters(
    rabbit: RabbitConnection,
    queue: str,
    dead_letter_queue: str,
    run_id: Optional[str] = None,
    reason_contains: Optional[str] = None,
    batch_size: int = 500,
) -> Dict[str, int]:
    """Moves the dead letters that match (all, or those of ``run_id`` / with ``reason_contains``) back
    to the update queue, as Logstash's dead-letter-queue input does after a fix; the others stay.

    Each replayed letter is published to ``queue`` in a committed transaction before it is acked on
    the dead-letter queue, so a crash in between duplicates a (versioned, harmless) update and loses
    none. A letter whose original message is not JSON is replayed as it was, and the consumer
    dead-letters it again if it is still bad.
    """
    connection = rabbit.connect()
    counts = {"replayed": 0, "kept": 0}
    try:
        source = connection.channel()
        declare_queues(source, queue, dead_letter_queue)
        target = connection.channel()
        target.tx_select()
        waiting = source.queue_declare(queue=dead_letter_queue, passive=True).method.message_count
        properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json")
        taken: List[int] = []
        kept: List[int] = []

        def commit() -> None:
            target.tx_commit()
            for tag in taken:
                source.basic_ack(tag)
            counts["replayed"] += len(taken)
            taken.clear()

        for _ in range(waiting):  # each letter once: those kept go back only after the pass
            method, _props, body = source.basic_get(dead_letter_queue, auto_ack=False)
            if method is None:
                break
            record = json.loads(body)
            if (run_id and record.get("run_id") != run_id) or (reason_contains and reason_contains not in record.get("reason", "")):
                kept.append(method.delivery_tag)
                continue
            target.basic_publish(exchange="", routing_key=queue, body=record["body"].encode("utf-8"), properties=properties)
            taken.append(method.delivery_tag)
            if len(taken) >= batch_size:
                commit()
        commit()
        for tag in kept:
            source.basic_nack(tag, requeue=True)
        counts["kept"] = len(kept)
    finally:
        connection.close()
    log.info("dead letters: %d replayed to %s, %d kept", counts["replayed"], queue, counts["kept"])
    return counts
