"""Publisher and consumer against the real RabbitMQ server and the Elasticsearch stand-in,
asserting document by document on what Elasticsearch holds afterwards."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from elasticsearch import helpers

from services.publish import declare_queues, message, publish_parallel, publish_stream
from services.search_index import PRODUCT_MAPPINGS, recreate_index

from conftest import ES_PORT, REPO, start_elasticsearch, stop_elasticsearch

pytestmark = pytest.mark.service


@pytest.fixture
def setup(es, es_url, rabbit_vhost, unique, tmp_path):
    index = f"products-{unique}"
    recreate_index(es, index, PRODUCT_MAPPINGS)
    helpers.bulk(
        es,
        ({"_index": index, "_id": str(i), "_source": {"id": str(i), "title": f"product {i}", "gender": "Men"}} for i in range(300)),
        refresh=True,
    )
    raw = yaml.safe_load((REPO / "feature_config.yaml").read_text())
    raw["publish"].update(queue=f"q-{unique}", dead_letter_queue=f"dlq-{unique}", consumer_bulk_size=50, consumer_flush_s=0.5)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    procs = []

    def start_consumer(rate_limit=5000):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "entrypoints.cli",
                "--es-url",
                es_url,
                "--rabbit-vhost",
                rabbit_vhost.virtual_host,
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
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        return proc

    yield {"index": index, "queue": f"q-{unique}", "dlq": f"dlq-{unique}", "start_consumer": start_consumer, "rabbit": rabbit_vhost}
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    connection = rabbit_vhost.connect()
    channel = connection.channel()
    channel.queue_delete(f"q-{unique}")
    channel.queue_delete(f"dlq-{unique}")
    connection.close()


def prediction(pid, version, label="Apparel", run="r1"):
    return message(
        "predictions", pid, run, f"model-{version}", version, {"categories": [{"id": label, "score": 0.9, "level": 1}], "attributes": {}}
    )


def predictions(start, end, version):
    return (prediction(str(i), version) for i in range(start, end))


def wait_for(check, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError("condition not met in time")


def docs(es, index):
    es.indices.refresh(index=index)
    return {h["_id"]: h["_source"] for h in helpers.scan(es, index=index, query={"query": {"match_all": {}}})}


def drain(rabbit, queue):
    connection = rabbit.connect()
    channel = connection.channel()
    out = []
    while True:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append((props.headers or {}, json.loads(body)))
    connection.close()
    return out


def test_every_update_lands_and_nothing_else_on_the_document_is_lost(es, setup):
    setup["start_consumer"]()
    sent = publish_parallel(setup["rabbit"], setup["queue"], setup["dlq"], predictions(0, 300, 100), workers=2)
    assert sent == {"predictions": 300}
    wait_for(lambda: sum(d.get("prediction_version") == 100 for d in docs(es, setup["index"]).values()) == 300)
    for pid, d in docs(es, setup["index"]).items():
        assert d["title"] == f"product {pid}" and d["gender"] == "Men"
        assert d["predicted_categories"][0]["id"] == "Apparel" and d["model_version"] == "model-100"


def test_poison_messages_are_dead_lettered_with_reason_and_the_rest_flows(es, setup):
    connection = setup["rabbit"].connect()
    channel = connection.channel()
    declare_queues(channel, setup["queue"], setup["dlq"])
    for body in (
        b"{not json",
        json.dumps({**prediction("1", 5), "schema_version": 99}).encode(),
        json.dumps({**prediction("2", 5), "body": {}}).encode(),
    ):
        channel.basic_publish("", setup["queue"], body)
    connection.close()
    publish_stream(setup["rabbit"], setup["queue"], setup["dlq"], [prediction("no-such-product", 5), prediction("3", 5)])
    setup["start_consumer"]()
    wait_for(lambda: docs(es, setup["index"])["3"].get("prediction_version") == 5)
    dead = []
    wait_for(lambda: dead.extend(drain(setup["rabbit"], setup["dlq"])) or len(dead) >= 4)
    reasons = sorted(b["reason"].split(":")[0] for _, b in dead)
    assert reasons == ["http_404", "invalid_json", "invalid_schema", "unsupported_schema_version"]
    assert any(h.get("x-prodcat-reason", "").startswith("http_404") for h, _ in dead)
    assert "prediction_version" not in docs(es, setup["index"])["1"]


def test_replays_and_out_of_order_versions_leave_the_newest(es, setup):
    setup["start_consumer"]()
    stream = [
        prediction("7", 200, "New"),
        prediction("7", 100, "Old"),
        prediction("7", 200, "New"),
        prediction("8", 100, "Old"),
        prediction("8", 200, "New"),
        prediction("8", 100, "Old"),
    ]
    publish_stream(setup["rabbit"], setup["queue"], setup["dlq"], stream)
    publish_stream(setup["rabbit"], setup["queue"], setup["dlq"], [prediction("9", 1)])  # a marker sent last
    wait_for(lambda: docs(es, setup["index"])["9"].get("prediction_version") == 1)
    current = docs(es, setup["index"])
    for pid in ("7", "8"):
        assert current[pid]["prediction_version"] == 200
        assert current[pid]["predicted_categories"][0]["id"] == "New"
        assert current[pid]["model_version"] == "model-200"


def test_sigkill_mid_batch_then_restart_loses_nothing(es, setup):
    publish_parallel(setup["rabbit"], setup["queue"], setup["dlq"], predictions(0, 300, 300), workers=1)
    proc = setup["start_consumer"](rate_limit=20)  # slow, so that the kill lands mid-stream
    wait_for(lambda: sum(d.get("prediction_version") == 300 for d in docs(es, setup["index"]).values()) >= 50)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sum(d.get("prediction_version") == 300 for d in docs(es, setup["index"]).values()) < 300
    setup["start_consumer"]()
    wait_for(lambda: sum(d.get("prediction_version") == 300 for d in docs(es, setup["index"]).values()) == 300)
    assert drain(setup["rabbit"], setup["dlq"]) == []


def test_elasticsearch_down_while_consuming_backs_off_and_catches_up(es, setup):
    setup["start_consumer"]()
    publish_stream(setup["rabbit"], setup["queue"], setup["dlq"], (prediction(str(i), 400) for i in range(100)))
    wait_for(lambda: sum(d.get("prediction_version") == 400 for d in docs(es, setup["index"]).values()) == 100)
    stop_elasticsearch(ES_PORT)
    publish_stream(setup["rabbit"], setup["queue"], setup["dlq"], (prediction(str(i), 500) for i in range(100, 300)))
    time.sleep(3)
    start_elasticsearch(ES_PORT)
    wait_for(lambda: sum(d.get("prediction_version") == 500 for d in docs(es, setup["index"]).values()) == 200, seconds=120)
    assert drain(setup["rabbit"], setup["dlq"]) == []


def test_rabbitmq_restart_while_publishing_loses_nothing(es, setup):
    """The broker's app is stopped and started in the middle of the stream: the publisher reconnects
    and resends the uncommitted batch, the consumer reconnects, and every update reaches the index."""
    setup["start_consumer"]()

    def stream():
        for i in range(300):
            if i == 150:
                subprocess.run(["rabbitmqctl", "stop_app"], check=True, stdout=subprocess.DEVNULL)
                subprocess.run(["rabbitmqctl", "start_app"], check=True, stdout=subprocess.DEVNULL)
            yield prediction(str(i), 600)

    # batches of 50: the restart lands after three committed batches, in the middle of the stream
    sent = publish_stream(setup["rabbit"], setup["queue"], setup["dlq"], stream(), batch_size=50)
    assert sent["predictions"] >= 300  # at least once: a batch whose commit-ok was lost goes twice
    wait_for(lambda: sum(d.get("prediction_version") == 600 for d in docs(es, setup["index"]).values()) == 300, seconds=120)
    assert drain(setup["rabbit"], setup["dlq"]) == []
