"""The reconciler and the dead-letter replay against the real RabbitMQ and the Elasticsearch stand-in."""

import dataclasses
import gzip
import json
import logging
import time

import pika
import pytest
from elasticsearch import helpers

from benchmarks.chaos import write_predictions
from core import storage
from pipelines.writeback import NotWritten, ReconcileState, Target, check, missing_ids, replay_dead_letters, unchanged_ids
from services.consumer import update_action
from services.publish import declare_queues, message
from services.search_index import DEAD_LETTER_MAPPINGS, PRODUCT_MAPPINGS, ensure_index, recreate_index

pytestmark = pytest.mark.service


@pytest.fixture
def target(es, rabbit_vhost, unique, tmp_path):
    index, queue, dlq = f"wb-{unique}", f"wb-q-{unique}", f"wb-dlq-{unique}"
    recreate_index(es, index, PRODUCT_MAPPINGS)
    helpers.bulk(es, ({"_index": index, "_id": str(i), "_source": {"id": str(i)}} for i in range(5)), refresh=True)
    write_predictions(str(tmp_path / "predict"), 5)
    connection = rabbit_vhost.connect()
    declare_queues(connection.channel(), queue, dlq)
    connection.close()
    yield Target(
        es=es,
        rabbit=rabbit_vhost,
        index=index,
        queue=queue,
        dead_letter_queue=dlq,
        kind="predictions",
        source_dir=str(tmp_path / "predict"),
        run_id=f"run-{unique}",
        version=7,
        publish_workers=1,
    )
    connection = rabbit_vhost.connect()
    channel = connection.channel()
    channel.queue_delete(queue)
    channel.queue_delete(dlq)
    connection.close()


def take_all(rabbit, queue):
    """Acks every waiting message without writing it: a consumer whose writes all vanish."""
    connection = rabbit.connect()
    channel = connection.channel()
    out = []
    while True:
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append(json.loads(body))
    connection.close()
    return out


def test_reconciler_republishes_exactly_the_missing_updates_then_fails_naming_them(es, target):
    helpers.bulk(
        es, ({"_op_type": "update", "_index": target.index, "_id": i, "doc": {"prediction_version": 7}} for i in ("0", "1")), refresh=True
    )
    state = ReconcileState(published=5)
    republished = []
    with pytest.raises(NotWritten) as failed:
        for _ in range(10):
            state = check(target, state, stall_checks=1, max_attempts=2, now=time.time(), max_between_s=60.0)
            republished.append(sorted(m["id"] for m in take_all(target.rabbit, target.queue)))
    assert [r for r in republished if r] == [["2", "3", "4"], ["2", "3", "4"]]
    assert [a["republished"] for a in state.attempts] == [3, 3]
    assert sorted(failed.value.ids) == ["2", "3", "4"] and "2, 3, 4" in str(failed.value)


def test_reconciler_finishes_when_every_update_is_written_or_dead_lettered(es, target):
    helpers.bulk(
        es,
        ({"_op_type": "update", "_index": target.index, "_id": str(i), "doc": {"prediction_version": 8}} for i in range(4)),
        refresh=True,
    )  # four hold a newer run's update
    ensure_index(es, "prodcat-dead-letters", DEAD_LETTER_MAPPINGS)  # as the consumer creates it
    es.index(
        index="prodcat-dead-letters",
        document={"id": "4", "run_id": target.run_id, "kind": "predictions", "reason": "http_400"},
        refresh=True,
    )
    state = check(target, ReconcileState(published=5), stall_checks=1, max_attempts=1, now=time.time(), max_between_s=60.0)
    assert state.finished and state.attempts == [] and take_all(target.rabbit, target.queue) == []


def test_reconciler_finishes_without_a_scan_when_the_run_wrote_every_update(es, target, monkeypatch):
    def scan(_target):
        raise AssertionError("scanned for missing ids")

    monkeypatch.setattr("pipelines.writeback.missing_ids", scan)
    body = {"categories": [], "attributes": {}}
    apply(es, target.index, (message("predictions", str(i), target.run_id, "m", 7, body) for i in range(4)))
    state = check(target, ReconcileState(published=4), stall_checks=1, max_attempts=1, now=time.time(), max_between_s=60.0)
    assert state.finished and state.counts["written_by_run"] == 4
    apply(es, target.index, [message("predictions", "3", "newer-run", "m", 8, body)])
    with pytest.raises(AssertionError, match="scanned"):  # a newer run wrote one: the ids decide
        check(target, ReconcileState(published=4), stall_checks=1, max_attempts=1, now=time.time(), max_between_s=60.0)


def test_a_check_leaves_elasticsearch_alone_until_a_count_is_due(target, monkeypatch):
    def progress(*_args, **_kwargs):
        raise AssertionError("counted")

    monkeypatch.setattr("pipelines.writeback.progress", progress)
    connection = target.rabbit.connect()
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish("", target.queue, b"{}")  # messages still wait
    connection.close()
    now = time.time()
    state = ReconcileState(published=5, done=1, checked_at=now, pace=0.1)  # the pace says the rest needs 48 s
    before = state.to_json()
    assert check(target, state, stall_checks=1, max_attempts=1, now=now + 10, max_between_s=60.0).to_json() == before
    with pytest.raises(AssertionError, match="counted"):
        check(target, state, stall_checks=1, max_attempts=1, now=now + 50, max_between_s=60.0)


@pytest.mark.parametrize(
    "waiting, pace, refreshes",
    [
        (True, 0.0, [False]),  # this kind's messages wait their turn: a stale count changes nothing
        (True, 0.5, [False, True]),  # its writes were going on: the count may be stale
        (False, 0.0, [False, True]),  # the queue is empty: a stall may be called
    ],
)
def test_a_count_without_progress_is_refreshed_only_where_it_matters(target, monkeypatch, waiting, pace, refreshes):
    from pipelines import writeback

    seen = []

    def progress(t, refresh=True):
        seen.append(refresh)
        return real(t, refresh)

    real = writeback.progress
    monkeypatch.setattr("pipelines.writeback.progress", progress)
    if waiting:
        connection = target.rabbit.connect()
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", target.queue, b"{}")
        connection.close()
    state = ReconcileState(published=5, done=0, checked_at=1000.0, pace=pace)
    state = check(target, state, stall_checks=5, max_attempts=1, now=1100.0, max_between_s=60.0)
    assert seen == refreshes and (state.done, state.unchanged_checks) == (0, 1)


@pytest.mark.parametrize(
    "waiting_before, level, says",
    [(5, logging.INFO, "4 taken since the last count"), (1, logging.WARNING, "is the consumer running?")],
)
def test_no_progress_while_the_queue_drains_is_no_warning(target, caplog, waiting_before, level, says):
    connection = target.rabbit.connect()
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish("", target.queue, b"{}")  # one message waits
    connection.close()
    state = ReconcileState(published=5, done=0, checked_at=1000.0, unchanged_checks=2, waiting=waiting_before)
    with caplog.at_level(logging.INFO, logger="pipelines.writeback"):
        state = check(target, state, stall_checks=3, max_attempts=1, now=1100.0, max_between_s=60.0)
    (record,) = [r for r in caplog.records if "no progress" in r.getMessage()]
    assert (record.levelno, state.waiting, state.unchanged_checks) == (level, 1, 3) and says in record.getMessage()


def test_the_pace_comes_from_two_counts_with_writes_going_on(es, target):
    def written(*ids):
        updates = ({"_op_type": "update", "_index": target.index, "_id": i, "doc": {"prediction_version": 7}} for i in ids)
        helpers.bulk(es, updates, refresh=True)

    written("0")
    state = check(target, ReconcileState(published=5), stall_checks=5, max_attempts=1, now=1000.0, max_between_s=60.0)
    assert (state.done, state.pace, state.checked_at) == (1, 0.0, 1000.0)  # one count: no pace yet
    written("1", "2")
    state = check(target, state, stall_checks=5, max_attempts=1, now=1004.0, max_between_s=60.0)
    assert (state.done, state.pace, state.checked_at) == (3, 0.5, 1004.0)
    state = check(target, state, stall_checks=5, max_attempts=1, now=1008.0, max_between_s=60.0)
    assert (state.done, state.pace) == (3, 0.0)  # no progress: no pace


def test_a_check_counts_when_the_queue_cannot_be_read(es, target, monkeypatch):
    def unreadable(*_args):
        raise pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no queue")

    monkeypatch.setattr("pipelines.writeback.ready_messages", unreadable)
    helpers.bulk(
        es,
        ({"_op_type": "update", "_index": target.index, "_id": str(i), "doc": {"prediction_version": 7}} for i in range(5)),
        refresh=True,
    )
    state = ReconcileState(published=5, done=1, checked_at=time.time(), pace=0.01)  # the pace alone says wait
    assert check(target, state, stall_checks=1, max_attempts=1, now=time.time(), max_between_s=60.0).finished


def test_a_rerun_publication_does_not_count_the_earlier_tries_writes(es, target):
    body = {"categories": [], "attributes": {}}
    earlier, rerun = dataclasses.replace(target, publication="try1"), dataclasses.replace(target, publication="try2")
    apply(es, target.index, (dict(m, body=body) for m in earlier.messages()))  # the same run and version
    state = check(rerun, ReconcileState(published=5), stall_checks=5, max_attempts=1, now=time.time(), max_between_s=60.0)
    assert not state.finished and state.counts["indexed"] == 0 and missing_ids(rerun) == {"0", "1", "2", "3", "4"}
    apply(es, target.index, [dict(m, body=body) for m in rerun.messages() if m["id"] != "4"])
    apply(es, target.index, [message("predictions", "4", "newer-run", "m", 8, body, "later")])
    state = check(rerun, ReconcileState(published=5), stall_checks=5, max_attempts=1, now=time.time(), max_between_s=60.0)
    assert state.finished and state.counts["indexed"] == 5 and state.counts["written_by_run"] == 4


def test_replay_moves_matching_dead_letters_back_and_keeps_the_rest(target):
    good = message("predictions", "3", target.run_id, "m", 7, {"categories": [], "attributes": {}})
    letters = [
        {"reason": "http_404: document_missing_exception", "run_id": target.run_id, "body": json.dumps(good)},
        {"reason": "invalid_json: Expecting value", "body": "{not json"},
        {"reason": "http_404: document_missing_exception", "run_id": "another-run", "body": json.dumps(good)},
    ]
    connection = target.rabbit.connect()
    channel = connection.channel()
    for letter in letters:
        channel.basic_publish("", target.dead_letter_queue, json.dumps(letter).encode())
    connection.close()
    counts = replay_dead_letters(target.rabbit, target.queue, target.dead_letter_queue, run_id=target.run_id, reason_contains="http_404")
    assert counts == {"replayed": 1, "kept": 2}
    assert take_all(target.rabbit, target.queue) == [good]
    assert sorted(d["reason"][:8] + d.get("run_id", "") for d in take_all(target.rabbit, target.dead_letter_queue)) == sorted(
        ["http_404another-run", "invalid_"]
    )


def write_neighbours(neighbours_dir: str, lists: dict) -> None:
    with storage.atomic_stage(neighbours_dir) as tmp:
        with storage.open_write(storage.join(tmp, "neighbours-00000-of-00001.jsonl.gz")) as raw, gzip.GzipFile(fileobj=raw, mode="wb") as f:
            for pid, neighbours in lists.items():
                f.write(json.dumps({"group": "g", "id": pid, "neighbours": neighbours}).encode() + b"\n")


def apply(es, index, messages):
    """Writes updates as the consumer does."""
    helpers.bulk(
        es, ({"_op_type": "update", "_index": index, "_id": m["id"], **update_action(index, m)[1]} for m in messages), refresh=True
    )


def test_unchanged_neighbours_are_found_and_not_waited_for(es, target, tmp_path):
    same = [{"id": "1", "score": 0.75}, {"id": "2", "score": 0.5}]
    other = [{"id": "3", "score": 0.75}]
    stored = {"0": same, "1": same, "3": other}  # as an older run (version 3) wrote them; 2 and 4 hold none
    run = {"0": same, "1": other, "2": [], "3": [], "4": same}
    apply(es, target.index, (message("neighbours", pid, "older-run", None, 3, {"neighbours": n}) for pid, n in stored.items()))
    write_neighbours(str(tmp_path / "neighbours"), run)
    target = dataclasses.replace(target, kind="neighbours", source_dir=str(tmp_path / "neighbours"))
    unchanged = unchanged_ids(target)
    assert unchanged == {"0", "2"}  # the same list; no list where none was; 3's list must be cleared
    apply(
        es,
        target.index,
        (message("neighbours", pid, target.run_id, None, target.version, {"neighbours": run[pid]}) for pid in ("1", "3", "4")),
    )
    sent = dataclasses.replace(target, unchanged=frozenset(unchanged))
    state = check(sent, ReconcileState(published=3), stall_checks=1, max_attempts=1, now=time.time(), max_between_s=60.0)
    assert state.finished and take_all(target.rabbit, target.queue) == []
    assert missing_ids(sent) == set() and missing_ids(target) == {"0", "2"}  # without the list they count as missing
