"""Update messages without services: built from a run's files, checked by the consumer, turned into updates."""

import gzip
import json

import pytest

from pipelines.writeback import ReconcileState, sooner_check_s, update_messages
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
    "done, before, expected",
    [
        (33_000, 24_000, 3.8),  # 900/s, 2,500 left: due in 2.8 s, checked with a margin
        (10_000, 1_000, None),  # 25,000 left at 900/s: the regular poke
        (35_450, 33_000, 2.0),  # nearly done: no sooner than two seconds
        (24_000, 24_000, None),  # no progress: the regular poke (stalls are counted on it)
        (1_000, -1, None),  # the first check: no pace yet
    ],
)
def test_the_next_check_comes_sooner_when_the_pace_says_the_rest_arrives_within_the_poke(done, before, expected):
    sooner = sooner_check_s(ReconcileState(published=35_500, done=done), before, seconds=10.0, poke_s=10.0)
    assert sooner == pytest.approx(expected, abs=0.1) if expected else sooner is None
