"""Update messages without services: built from a run's files, checked by the consumer, turned into updates."""

import gzip
import json

import pytest

from pipelines.writeback import ReconcileState, count_due, sooner_check_s, update_messages
from services.consumer import PoisonMessage, parse_message, update_action
from services.publish import message
from trainer.predict import PREDICTIONS_FILE

pytestmark = pytest.mark.unit


def neighbours_message(neighbours):
    return message("neighbours", "p1", "run-1", "m1", 3, {"neighbours": neighbours})


def test_neighbours_are_written_as_parallel_id_and_score_arrays():
    msg = parse_message(json.dumps(neighbours_message([{"id": "p2", "score": 0.9}, {"id": "p3", "score": 0.5}])).encode())
    header, body = update_action("products", msg)
    assert header["update"]["_id"] == "p1"
    assert body["script"]["params"]["visual_neighbours"] == {"ids": ["p2", "p3"], "scores": [0.9, 0.5]}
    assert body["script"]["params"]["version"] == 3


@pytest.mark.parametrize("neighbours", [None, [{"id": "p2"}], [{"id": 2, "score": 0.5}], ["p2"]])
def test_malformed_neighbours_are_poison_with_a_reason(neighbours):
    with pytest.raises(PoisonMessage, match="invalid_schema: neighbours must be a list"):
        parse_message(json.dumps(neighbours_message(neighbours)).encode())


def test_which_classifier_decided_is_written_and_cleared_by_a_message_without_it():
    categories = {"categories": [], "attributes": {}}
    fewshot = {"classifier": "probe", "category": "Flats", "score": 0.8, "threshold": 0.0, "decided": True}
    with_it = message("predictions", "p1", "run-2", "m2", 2, {**categories, "decided_by": "probe", "fewshot": fewshot})
    params = update_action("products", parse_message(json.dumps(with_it).encode()))[1]["script"]["params"]
    assert params["decided_by"] == "probe" and params["fewshot_match"] == fewshot
    older = message("predictions", "p1", "run-1", "m1", 1, categories)
    params = update_action("products", parse_message(json.dumps(older).encode()))[1]["script"]["params"]
    assert params["decided_by"] is None and params["fewshot_match"] is None


def test_predictions_written_before_the_fewshot_classifier_still_publish(tmp_path):
    old = {"id": "p1", "model_version": "m1", "categories": [], "attributes": {}}
    new = {**old, "id": "p2", "decided_by": "probe", "fewshot": {"category": "Flats"}}
    with gzip.open(tmp_path / PREDICTIONS_FILE, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in (old, new)) + "\n")
    (tmp_path / "_SUCCESS").write_text("")
    bodies = {m["id"]: m["body"] for m in update_messages("predictions", str(tmp_path), "run-1", 1)}
    assert bodies["p1"]["decided_by"] is None and bodies["p1"]["fewshot"] is None
    assert bodies["p2"]["decided_by"] == "probe" and bodies["p2"]["fewshot"] == {"category": "Flats"}


def test_the_publication_is_written_and_a_message_from_before_it_clears_it():
    categories = {"categories": [], "attributes": {}}
    msg = message("predictions", "p1", "run-2", "m2", 2, categories, "try-2")
    assert update_action("products", parse_message(json.dumps(msg).encode()))[1]["script"]["params"]["publication"] == "try-2"
    older = {k: v for k, v in msg.items() if k != "publication"}
    assert update_action("products", parse_message(json.dumps(older).encode()))[1]["script"]["params"]["publication"] is None
    with pytest.raises(PoisonMessage, match="publication must be str"):
        parse_message(json.dumps({**msg, "publication": 3}).encode())


@pytest.mark.parametrize(
    "done, pace, since, expected",
    [
        (33_000, 900.0, 0.0, 3.8),  # 2,500 left at 900/s: due in 2.8 s, checked with a margin
        (10_000, 900.0, 0.0, None),  # 25,500 left at 900/s: the regular poke
        (35_450, 900.0, 0.0, 2.0),  # nearly done: no sooner than two seconds
        (10_000, 100.0, 55.0, 5.0),  # the pace says 306 s, but a count is due 60 s after the last
        (24_000, 0.0, 0.0, None),  # no progress: the regular poke (stalls are counted on it)
    ],
)
def test_the_next_check_comes_sooner_when_the_next_count_is_due_within_the_poke(done, pace, since, expected):
    state = ReconcileState(published=35_500, done=done, checked_at=1000.0, pace=pace)
    sooner = sooner_check_s(state, now=1000.0 + since, poke_s=10.0, max_between_s=60.0)
    assert sooner == pytest.approx(expected, abs=0.1) if expected else sooner is None


@pytest.mark.parametrize(
    "done, pace, since, waiting, expected",
    [
        (-1, 0.0, 0.0, 50_000, True),  # the first check counts
        (10_000, 900.0, 10.0, 20_000, False),  # the pace says the rest needs 34 s more
        (10_000, 900.0, 34.5, 20_000, True),
        (10_000, 900.0, 10.0, 0, True),  # the queue is empty: the rest is written or being written
        (0, 0.0, 10.0, 40_000, False),  # no pace: more messages wait than updates remain
        (0, 0.0, 10.0, 7_000, True),  # fewer wait than remain: ours may be done
        (0, 0.0, 60.0, 40_000, True),  # at least one count a minute whatever the signs
    ],
)
def test_a_check_counts_in_elasticsearch_only_where_the_rest_may_have_arrived(done, pace, since, waiting, expected):
    state = ReconcileState(published=35_500 if pace else 7_580, done=done, checked_at=1000.0, pace=pace)
    assert count_due(state, waiting, now=1000.0 + since, max_between_s=60.0) is expected
