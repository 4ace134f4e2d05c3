"""Publish-and-index benchmark: N updates published with confirms at 1, 2 and 4 publisher worker threads,
consumed into Elasticsearch by one ``prodcat consume`` process; publish messages/s, end-to-end
indexed documents/s, lost updates, and how close the consumer's rate limiter holds its setting.

    python -m benchmarks.publish [--messages 100000] [--es-url http://127.0.0.1:9200]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import yaml
from elasticsearch import helpers

from benchmarks.results_file import RESULTS_DIR, write_results
from pipelines.publish import RabbitConnection, declare_queues, message, publish_parallel
from pipelines.search_index import PRODUCT_MAPPINGS, EsConnection, recreate_index

REPO = Path(__file__).resolve().parents[1]
INDEX = "bench-publish-products"
NAME = "publish"


def updates(n: int, version: int) -> Iterator[dict]:
    body = {"categories": [{"id": "Apparel", "name": "Apparel", "level": 1, "score": 0.9, "confident": True}], "attributes": {}}
    for i in range(n):
        yield message("predictions", str(i), f"bench-{version}", f"m{version}", version, body)


def applied(es, version: int) -> int:
    es.indices.refresh(index=INDEX)
    return es.count(index=INDEX, query={"term": {"prediction_version": version}})["count"]


def start_consumer(es_url: str, config: Path, rate_limit: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "--es-url", es_url, "--products-index", INDEX, "--config", str(config),
                             "consume", "--rate-limit", str(rate_limit)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_applied(es, version: int, expected: int, timeout_s: float) -> float:
    started = time.perf_counter()
    while applied(es, version) < expected:
        if time.perf_counter() - started > timeout_s:
            break
        time.sleep(5)  # counting 100k documents is not free on the stand-in
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4],
                        help="publisher worker counts; none: only the rate-limiter check, rows kept from the last results file")
    parser.add_argument("--es-url", default="http://127.0.0.1:9200")
    parser.add_argument("--rate-limit", type=float, default=100.0,
                        help="setting for the rate-limiter check: below what the cluster absorbs, so that the limiter sets the pace")
    args = parser.parse_args()
    from pipelines.config import load_config

    # its own queues, so that a running `prodcat consume` does not take the benchmark's messages
    raw = yaml.safe_load((REPO / "feature_config.yaml").read_text())
    raw["publish"].update(queue="bench-publish-updates", dead_letter_queue="bench-publish-dead-letters")
    config = Path(tempfile.mkdtemp(prefix="bench-publish-")) / "feature_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    publish_cfg = load_config(config).publish
    es = EsConnection(url=args.es_url).client()
    rabbit = RabbitConnection()
    connection = rabbit.connect()
    channel = connection.channel()
    declare_queues(channel, publish_cfg.queue, publish_cfg.dead_letter_queue)
    for queue in (publish_cfg.queue, publish_cfg.dead_letter_queue):
        channel.queue_purge(queue)  # leftovers of an interrupted run
    connection.close()
    recreate_index(es, INDEX, PRODUCT_MAPPINGS)
    helpers.bulk(es, ({"_index": INDEX, "_id": str(i), "_source": {"id": str(i), "title": f"product {i}"}} for i in range(args.messages)),
                 chunk_size=5000, refresh=True)
    rows = []
    consumer = start_consumer(args.es_url, config, 1e9)
    try:
        for version, workers in enumerate(args.workers, start=1):
            started = time.perf_counter()
            sent = sum(publish_parallel(rabbit, publish_cfg.queue, publish_cfg.dead_letter_queue,
                                        updates(args.messages, version), workers).values())
            published = time.perf_counter()
            done = wait_applied(es, version, args.messages, timeout_s=1800)
            rows.append({
                "workers": workers,
                "messages": sent,
                "publish_msgs_per_s": round(sent / (published - started), 1),
                "indexed_docs_per_s": round(args.messages / (done - started), 1),
                "lost": args.messages - applied(es, version),
            })
            print(rows[-1], flush=True)
    finally:
        consumer.terminate()
        consumer.wait(timeout=120)

    check = min(args.messages, int(args.rate_limit * 20))
    version = len(args.workers) + 1
    publish_parallel(rabbit, publish_cfg.queue, publish_cfg.dead_letter_queue, updates(check, version), 2)
    consumer = start_consumer(args.es_url, config, args.rate_limit)
    try:
        while applied(es, version) == 0:
            time.sleep(1)
        first, t0 = applied(es, version), time.perf_counter()
        time.sleep(10)
        observed = (applied(es, version) - first) / (time.perf_counter() - t0)
        wait_applied(es, version, check, timeout_s=600)
    finally:
        consumer.terminate()
        consumer.wait(timeout=120)
    if not args.workers:
        rows = json.loads((RESULTS_DIR / f"{NAME}.json").read_text())["rows"]
    write_results(NAME, {"rows": rows, "rate_limit": {"setting": args.rate_limit, "observed": round(observed, 1)},
                         "consumer": {"bulk_size": publish_cfg.consumer_bulk_size, "prefetch": publish_cfg.consumer_prefetch}})


if __name__ == "__main__":
    main()
