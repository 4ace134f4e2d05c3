"""Write-back benchmark, each figure measured in this run:

- publishing: N prediction updates in committed batches at 1, 2 and 4 publisher threads, messages/s;
- consuming: a queue filled beforehand with N prediction updates (and N neighbour updates, 100
  neighbours each) drained by one ``prodcat consume`` process, and prediction updates by two
  processes on the same queue; documents/s from each consumer's first message to its last ack;
  ``--repeats`` rounds of the three rows, alternating, and the median of each row over the rounds;
- the Elasticsearch stand-in alone: the consumer's own bulk scripted updates sent straight to it, one
  request at a time and two at once: the ceiling the consumer is measured against;
- the rate limiter: documents/s observed for one consumer and for two on the same queue, each at a
  setting whose double is below what the cluster absorbs, so that the consumers set the pace: what
  a second consumer adds where the cluster is not the bound;
- with ``--chaos-updates``: the combined-fault sequence of :mod:`benchmarks.chaos`.

Everything that writes to Elasticsearch runs on a private stand-in (port 9271) that is reset and
loaded with N documents before each row: the stand-in's update rate falls as writes accumulate
since its start (measured: 1,376 then 1,235 then 1,202 documents/s for three rounds of 35,000),
so rows measured one after another on one instance would not compare.

    python -m benchmarks.publish [--messages 35000] [--repeats 3] [--chaos-updates 8918]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List

import psutil
import yaml
from elasticsearch import Elasticsearch, helpers

from benchmarks.chaos import run_chaos
from benchmarks.results_file import write_results
from services.consumer import update_action
from services.publish import RabbitConnection, declare_queues, message, publish_parallel
from services.search_index import PRODUCT_MAPPINGS, EsConnection, recreate_index

REPO = Path(__file__).resolve().parents[1]
INDEX = "bench-publish-products"
NAME = "publish"
BENCH_ES_PORT = 9271
CHAOS_ES_PORT = 9270


def updates(kind: str, n: int, version: int) -> Iterator[dict]:
    """``n`` updates of ``kind`` shaped like the pipeline's (three categories; 100 neighbours)."""
    if kind == "predictions":
        body = {
            "categories": [
                {"id": c, "name": c, "level": level, "score": 0.9, "confident": True}
                for level, c in enumerate(("Apparel", "Topwear", "Tshirts"), start=1)
            ],
            "attributes": {"colour": {"value": "Blue", "score": 0.8}},
            "decided_by": "model",
            "fewshot": {"classifier": "probe", "category": "Flats", "score": 0.41, "threshold": 0.0, "decided": False},
        }
    else:
        body = {"neighbours": [{"id": str(j), "score": round(1 - j / 1000, 4)} for j in range(100)]}
    for i in range(n):
        yield message(kind, str(i), f"bench-{version}", f"m{version}", version, body)


class PrivateStandIn:
    """An Elasticsearch stand-in of the benchmark's own (data under ``.prodcat/<name>``) on ``port``."""

    def __init__(self, name: str, port: int):
        self.noida = str(Path(sys.executable).parent / "noida-db")
        self.data = REPO / ".prodcat" / name
        self.url = f"http://127.0.0.1:{port}"
        self.port = port

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [self.noida, "up", "--data-dir", str(self.data), "--only", "elasticsearch", "--elasticsearch-port", str(self.port)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        es = self.client()
        deadline = time.monotonic() + 60
        while not es.ping() and time.monotonic() < deadline:
            time.sleep(0.5)

    def stop(self) -> None:
        subprocess.run([self.noida, "down", "--data-dir", str(self.data)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(self) -> Elasticsearch:
        return EsConnection(url=self.url).client()

    def process(self) -> psutil.Process:
        """The running stand-in's server process."""
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if "start" in cmdline and str(self.data) in cmdline:
                return proc
        raise RuntimeError(f"no stand-in process serves {self.data}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the running stand-in process so far."""
        times = self.process().cpu_times()
        return times.user + times.system

    def reset(self) -> None:
        """Restarts the stand-in empty."""
        if self.data.exists():
            self.stop()
            shutil.rmtree(self.data)
        self.start()

    def fresh(self, documents: int) -> Elasticsearch:
        """Restarts the stand-in empty, loads ``documents`` products, and returns a client."""
        self.reset()
        es = self.client()
        recreate_index(es, INDEX, PRODUCT_MAPPINGS)
        helpers.bulk(
            es,
            ({"_index": INDEX, "_id": str(i), "_source": {"id": str(i), "title": f"product {i}"}} for i in range(documents)),
            chunk_size=5000,
            refresh=True,
        )
        return es


def purge(rabbit: RabbitConnection, *queues: str) -> None:
    connection = rabbit.connect()
    channel = connection.channel()
    for q in queues:
        channel.queue_purge(q)
    connection.close()


def consumer_command(es_url: str, config: Path, rate_limit: float) -> List[str]:
    """The ``prodcat consume`` command line of the benchmark's consumers."""
    return [
        sys.executable,
        "-m",
        "entrypoints.cli",
        "--es-url",
        es_url,
        "--products-index",
        INDEX,
        "--config",
        str(config),
        "consume",
        "--rate-limit",
        str(rate_limit),
    ]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def consume(es_url: str, config: Path, processes: int, rate_limit: float, idle_exit_s: float = 3.0) -> List[dict]:
    """Runs ``processes`` consumers until the queue stays empty; returns each one's stats."""
    procs = [
        subprocess.Popen(
            [*consumer_command(es_url, config, rate_limit), "--idle-exit-s", str(idle_exit_s)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(processes)
    ]
    return [json.loads(proc.communicate(timeout=3600)[0].strip().splitlines()[-1]) for proc in procs]


def consumed_row(kind: str, processes: int, stats: List[dict], cpu: Dict[str, float]) -> dict:
    """One consuming row; ``cpu``: CPU seconds of the consumers (start-up and idle exit included)
    and of the stand-in over the same processes' lifetime, against the row's seconds."""
    docs = sum(s["applied"] + s["noop"] for s in stats)
    seconds = max(s["last_ack_at"] for s in stats) - min(s["first_message_at"] for s in stats)
    return {
        "kind": kind,
        "consumers": processes,
        "documents": docs,
        "dead_lettered": sum(s["dead_lettered"] for s in stats),
        "indexed_docs_per_s": round(docs / seconds, 1),
        "seconds": round(seconds, 1),
        "consumers_cpu_s": round(cpu["consumers"], 1),
        "stand_in_cpu_s": round(cpu["stand_in"], 1),
    }


def consuming_medians(rows: List[dict]) -> List[dict]:
    """Per kind and number of consumers: the median documents/s over the rounds, and each round's."""
    groups: Dict[tuple, List[float]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["consumers"]), []).append(row["indexed_docs_per_s"])
    return [
        {"kind": kind, "consumers": n, "median_docs_per_s": statistics.median(rates), "rounds": rates}
        for (kind, n), rates in groups.items()
    ]


def stand_in_alone(es: Elasticsearch, kind: str, n: int, version: int, concurrency: int, bulk_size: int = 500) -> float:
    """Documents/s of the consumer's bulk scripted updates sent straight to Elasticsearch."""
    batches, batch = [], []
    for m in updates(kind, n, version):
        batch.extend(update_action(INDEX, m))
        if len(batch) == 2 * bulk_size:
            batches.append(batch)
            batch = []
    batches.append(batch)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for response in pool.map(lambda ops: es.bulk(operations=ops), batches):
            if response["errors"]:
                raise RuntimeError("the stand-in rejected updates of the benchmark's own index")
    return round(n / (time.perf_counter() - started), 1)


def applied(es: Elasticsearch, version: int) -> int:
    es.indices.refresh(index=INDEX)
    return es.count(index=INDEX, query={"term": {"prediction_version": version}})["count"]


def rate_limit_check(
    es: Elasticsearch,
    es_url: str,
    rabbit: RabbitConnection,
    queues: Dict[str, str],
    config: Path,
    setting: float,
    version: int,
    processes: int = 1,
) -> float:
    """Documents/s that ``processes`` consumers, each limited to ``setting``, write together over
    10 s of a stream longer than that."""
    n = int(setting * processes * 20)
    publish_parallel(rabbit, queues["queue"], queues["dead_letter_queue"], updates("predictions", n, version), 2)
    procs = [
        subprocess.Popen(consumer_command(es_url, config, setting), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    try:
        while applied(es, version) == 0:
            time.sleep(0.5)
        first, t0 = applied(es, version), time.perf_counter()
        time.sleep(10)
        return round((applied(es, version) - first) / (time.perf_counter() - t0), 1)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=120)
        purge(rabbit, queues["queue"])


def chaos(n: int) -> dict:
    """The combined-fault sequence on a private stand-in (port 9270), which it stops and starts."""
    stand_in = PrivateStandIn("bench-chaos-noida", CHAOS_ES_PORT)
    stand_in.start()
    try:
        return run_chaos(
            stand_in.client(),
            stand_in.url,
            stand_in.stop,
            stand_in.start,
            RabbitConnection(),
            Path(tempfile.mkdtemp(prefix="bench-chaos-")),
            n,
            uuid.uuid4().hex[:8],
        )
    finally:
        stand_in.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=35_000, help="updates per row (the catalogue is 35,528 products)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="publisher thread counts")
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=400.0,
        help="per-consumer setting for the rate-limiter check, one consumer and two: twice it stays below what the"
        " cluster absorbs, so that the limiters set the pace",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the consuming rows: one and two consumers alternate within each")
    parser.add_argument("--chaos-updates", type=int, default=8918, help="updates in the combined-fault run (0: skip it)")
    args = parser.parse_args()
    from core.config import load_config

    # its own queues, so that a running `prodcat consume` does not take the benchmark's messages
    raw = yaml.safe_load((REPO / "feature_config.yaml").read_text())
    raw["publish"].update(queue="bench-publish-updates", dead_letter_queue="bench-publish-dead-letters")
    config = Path(tempfile.mkdtemp(prefix="bench-publish-")) / "feature_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    p = load_config(config).publish
    queues = {"queue": p.queue, "dead_letter_queue": p.dead_letter_queue}
    rabbit = RabbitConnection()
    connection = rabbit.connect()
    declare_queues(connection.channel(), p.queue, p.dead_letter_queue)
    connection.close()
    purge(rabbit, p.queue, p.dead_letter_queue)  # leftovers of an interrupted run

    version = 0
    publishing = []
    for workers in args.workers:
        version += 1
        purge(rabbit, p.queue)
        started = time.perf_counter()
        sent = sum(
            publish_parallel(
                rabbit, p.queue, p.dead_letter_queue, updates("predictions", args.messages, version), workers, p.batch_size
            ).values()
        )
        publishing.append(
            {
                "workers": workers,
                "messages": sent,
                "batch_size": p.batch_size,
                "publish_msgs_per_s": round(sent / (time.perf_counter() - started), 1),
            }
        )
        print(publishing[-1], flush=True)
    purge(rabbit, p.queue)

    stand_in = PrivateStandIn("bench-publish-noida", BENCH_ES_PORT)
    consuming, alone = [], []
    try:
        for round_no in range(1, args.repeats + 1):
            for kind, processes in (("predictions", 1), ("neighbours", 1), ("predictions", 2)):
                version += 1
                stand_in.fresh(args.messages)
                publish_parallel(rabbit, p.queue, p.dead_letter_queue, updates(kind, args.messages, version), 2, p.batch_size)
                consumers_cpu, stand_in_cpu = children_cpu_seconds(), stand_in.cpu_seconds()
                stats = consume(stand_in.url, config, processes, 0)
                cpu = {"consumers": children_cpu_seconds() - consumers_cpu, "stand_in": stand_in.cpu_seconds() - stand_in_cpu}
                consuming.append({"round": round_no, **consumed_row(kind, processes, stats, cpu)})
                print(consuming[-1], flush=True)
        for kind, concurrency in (("predictions", 1), ("predictions", 2), ("neighbours", 1)):
            version += 1
            es = stand_in.fresh(args.messages)
            alone.append(
                {
                    "kind": kind,
                    "concurrent_requests": concurrency,
                    "docs_per_s": stand_in_alone(es, kind, args.messages, version, concurrency, p.consumer_bulk_size),
                }
            )
            print(alone[-1], flush=True)
        observed = {}
        for processes in (1, 2):
            version += 1
            es = stand_in.fresh(args.messages)
            observed[processes] = rate_limit_check(es, stand_in.url, rabbit, queues, config, args.rate_limit, version, processes)
            print({"rate_limit": args.rate_limit, "consumers": processes, "observed": observed[processes]}, flush=True)
    finally:
        stand_in.stop()
    results = {
        "messages": args.messages,
        "publishing": publishing,
        "consuming": consuming,
        "consuming_median": consuming_medians(consuming),
        "stand_in_alone": alone,
        "stand_in": "noida-db, restarted empty and loaded with `messages` documents before each consuming and stand_in_alone row",
        "rate_limit": {"setting": args.rate_limit, "observed": observed[1], "observed_two_consumers": observed[2]},
        "consumer": {"bulk_size": p.consumer_bulk_size, "prefetch": p.consumer_prefetch, "concurrency": p.consumer_concurrency},
    }
    if args.chaos_updates:
        results["chaos"] = chaos(args.chaos_updates)
        print({k: v for k, v in results["chaos"].items() if k != "dead_letter_queue"}, flush=True)
    write_results(NAME, results)


if __name__ == "__main__":
    main()
