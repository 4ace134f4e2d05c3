"""The whole weekly run, measured: both DAGs with ``airflow dags test`` and a write-back consumer
running, on a catalogue. The visual-neighbours DAG starts when categorisation's ``predict`` stage is
complete, as the scheduler triggers it on the asset that task updates, so it runs alongside
categorisation's publish, wait and report (``--neighbours-after categorise``: after the whole run).

- cold: an empty image-embedding cache; warm: the same run again with the cache the cold run filled;
- with ``--scaling-factor``: the warm run on a catalogue that many times the size (the original plus
  perturbed copies, :mod:`benchmarks.scaled_catalogue`; copies' images reach the embedding cache).

Each run starts from nothing but the cache: its own Elasticsearch stand-in (port 9273, data under
``.prodcat/bench-dag``) restarted empty and seeded, its own RabbitMQ virtual host recreated, a new
data root and Airflow homes. Stage seconds come from Airflow's task instances: a task's end minus the
previous task's end, so that a sensor's reschedule waits count. Peak memory per stage: the RSS of
its DAG's ``airflow dags test`` process tree (tasks run inside it), sampled every 0.5 s over the stage.

    python -m benchmarks.dag [--catalogue ../shared/data/fashion] [--scaling-factor 3]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import psutil

from benchmarks.publish import PrivateStandIn
from benchmarks.results_file import write_results
from benchmarks.scaled_catalogue import write_scaled_catalogue
from core.config import load_config
from core.storage import SUCCESS, read_json
from entrypoints.cli import airflow_env, latest_run
from pipelines.writeback import update_messages
from services.consumer import update_action

REPO = Path(__file__).resolve().parents[1]
NAME = "dag"
WORK = REPO / ".prodcat" / "bench-dag"
ES_PORT = 9273
VHOST = "prodcat-bench-dag"
RUN_AFTER = "2026-11-22T00:00:00+00:00"
DAGS = {"prodcat_categorise": "categorise", "prodcat_visual_neighbours": "visual_neighbours"}
SAMPLE_EVERY_S = 0.5
TARGETS = {"cold_s": 300, "warm_s": 150}
PRODUCTS_INDEX = "products"  # where the DAG runs write (RunSettings' default)
ALONE_UPDATES = 5000


class Sampler:
    """Samples ``(time.time(), measure())`` every ``every_s`` in a thread; a measure of None is skipped."""

    def __init__(self, measure: Callable[[], Optional[float]], every_s: float):
        self._measure = measure
        self._every_s = every_s
        self._stop = threading.Event()
        self.samples: List[Tuple[float, float]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._measure()
            if value is not None:
                self.samples.append((time.time(), value))
            self._stop.wait(self._every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def tree_rss(pid: int) -> Callable[[], Optional[int]]:
    """A measure of the RSS bytes of process ``pid`` and its descendants (None once none is left)."""
    process = psutil.Process(pid)

    def measure() -> Optional[int]:
        rss = 0
        with contextlib.suppress(psutil.Error):
            for p in [process, *process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
        return rss or None

    return measure


def cpu_seconds(process: psutil.Process) -> Callable[[], Optional[float]]:
    """A measure of ``process``' user + system CPU seconds so far (None once it has gone)."""

    def measure() -> Optional[float]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            return None
        return times.user + times.system

    return measure


def task_ends(airflow_home: Path, dag_id: str) -> List[Tuple[str, str, float, float]]:
    """``(task, state, start, end)`` (Unix times) of the latest run of ``dag_id``, in task order."""
    with contextlib.closing(sqlite3.connect(airflow_home / "airflow.db")) as db:
        rows = db.execute(
            "SELECT task_id, state, start_date, end_date FROM task_instance WHERE dag_id = ? AND run_id = "
            "(SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1) ORDER BY end_date",
            (dag_id, dag_id),
        ).fetchall()

    def unix(stamp: str) -> float:
        return datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp()

    return [(task, state, unix(start), unix(end)) for task, state, start, end in rows]


def stage_figures(tasks: List[Tuple[str, str, float, float]], samples: List[Tuple[float, int]], prefix: str) -> Dict[str, dict]:
    """``{prefix.task: {"seconds", "peak_rss_mb"}}``: each task from the previous one's end (the first
    from its start) to its own end, and the largest RSS sample in that span (a span shorter than the
    sampling interval: the first sample after it)."""
    out = {}
    previous = tasks[0][2]
    for task, state, _, end in tasks:
        if state != "success":
            raise RuntimeError(f"{prefix}.{task} ended {state}")
        in_span = [rss for t, rss in samples if previous <= t <= end] or [rss for t, rss in samples if t > end][:1]
        out[f"{prefix}.{task}"] = {
            "seconds": round(end - previous, 1),
            "peak_rss_mb": round(max(in_span) / 2**20) if in_span else None,
        }
        previous = end
    return out


def write_back_figures(
    tasks: Dict[str, List[Tuple[str, str, float, float]]], stand_in_cpu: List[Tuple[float, float]], updates: int
) -> dict:
    """The write-back's span, from categorisation's publish start to the last ``wait_indexed`` end
    (``tasks`` by DAG prefix), with the ``updates`` both publishes sent in it, and the stand-in's CPU
    seconds over the span (from its samples: the last at or before the start, the first at or after
    the end)."""
    start = next(begin for task, _, begin, _ in tasks["categorise"] if task == "publish")
    end = max(finish for rows in tasks.values() for task, _, _, finish in rows if task == "wait_indexed")
    before = [cpu for t, cpu in stand_in_cpu if t <= start]
    after = [cpu for t, cpu in stand_in_cpu if t >= end]
    seconds = end - start
    figures = {"updates": updates, "seconds": round(seconds, 1), "updates_per_s": round(updates / seconds)}
    if before and after:
        figures["stand_in_cpu_s"] = round(after[0] - before[-1], 1)
    return figures


def stand_in_alone(es, predict_dir: Path, publish_summary: dict, count: int, bulk_size: int) -> dict:
    """The stand-in on its own, right after a run: ``count`` of the run's prediction updates sent
    again straight to it in bulk requests of ``bulk_size``, one version newer, so each is written."""
    messages = itertools.islice(
        update_messages("predictions", str(predict_dir), publish_summary["run_id"], publish_summary["version"] + 1, uuid.uuid4().hex),
        count,
    )
    operations = [part for msg in messages for part in update_action(PRODUCTS_INDEX, msg)]
    started = time.perf_counter()
    for i in range(0, len(operations), 2 * bulk_size):
        response = es.bulk(operations=operations[i : i + 2 * bulk_size])
        if response["errors"]:
            raise RuntimeError(f"the stand-in refused an update: {next(item for item in response['items'] if 'error' in item['update'])}")
    seconds = time.perf_counter() - started
    return {"updates": len(operations) // 2, "seconds": round(seconds, 1), "updates_per_s": round(len(operations) // 2 / seconds)}


class DagTest:
    """One ``airflow dags test`` process, its RSS sampled."""

    def __init__(self, airflow: str, dag_id: str, conf: dict, env: dict, log) -> None:
        self.dag_id = dag_id
        self.proc = subprocess.Popen(
            [airflow, "dags", "test", dag_id, RUN_AFTER, "--conf", json.dumps(conf)], env=env, stdout=log, stderr=log
        )
        self.sampler = Sampler(tree_rss(self.proc.pid), SAMPLE_EVERY_S)

    def wait(self) -> None:
        code = self.proc.wait()
        self.sampler.stop()
        if code:
            raise RuntimeError(f"{self.dag_id} failed (exit {code}); see the log")

    def wait_for_stage(self, data_root: str, stage: str) -> Path:
        """The run's ``stage`` folder once it is complete (polled while the DAG runs)."""
        while True:
            runs = Path(data_root, "runs", self.dag_id)
            folder = latest_run(data_root, self.dag_id) / stage if runs.exists() and any(runs.iterdir()) else None
            if folder is not None and (folder / SUCCESS).exists():
                return folder
            if self.proc.poll() is not None:
                self.wait()
                raise RuntimeError(f"{self.dag_id} ended without a complete {stage} folder")
            time.sleep(0.5)


def reset_vhost() -> None:
    """The benchmark's RabbitMQ virtual host, recreated empty."""
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "delete_vhost", VHOST], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([*ctl, "add_vhost", VHOST], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*ctl, "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"], check=True, stdout=subprocess.DEVNULL)


def fresh_work_dir(keep_cache: bool) -> Path:
    """Empties ``WORK/run`` (data root, Airflow home, logs), keeping the embedding cache if asked."""
    run = WORK / "run"
    cache = run / "data" / "embedding_cache"
    kept = WORK / "embedding_cache.kept"
    if keep_cache and cache.exists():
        cache.rename(kept)
    shutil.rmtree(run, ignore_errors=True)
    (run / "data").mkdir(parents=True)
    if keep_cache and kept.exists():
        kept.rename(cache)
    shutil.rmtree(kept, ignore_errors=True)
    return run


def measured_run(catalogue: Path, stand_in: PrivateStandIn, keep_cache: bool, label: str, neighbours_after: str = "predict") -> dict:
    """Both DAGs on ``catalogue`` from a fresh start but for the embedding cache when ``keep_cache``.
    The neighbours DAG starts when categorisation's ``predict`` folder is complete, as the scheduler
    triggers it on the ``prodcat://predictions`` asset that task updates (alongside categorisation's
    publish and wait), or with ``neighbours_after="categorise"`` once the categorisation run ended."""
    run = fresh_work_dir(keep_cache)
    data_root = str(run / "data")
    log_path = WORK / f"{label}.log"  # kept after the next run resets WORK/run
    stand_in.reset()
    reset_vhost()
    cli = [sys.executable, "-m", "entrypoints.cli", "--es-url", stand_in.url, "--rabbit-vhost", VHOST]
    seeded = subprocess.run(
        [*cli, "seed", "--catalogue", str(catalogue), "--image-base-url", f"file://{catalogue.resolve()}/images"],
        check=True,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    products = json.loads(seeded.stdout)["seeded_products"]
    airflow = str(Path(sys.executable).parent / "airflow")
    # One Airflow home per DAG, so that the two `dags test` processes, which run at once, never share
    # a SQLite database (it takes one writer at a time).
    envs = {dag_id: airflow_env(run / f"airflow-{short}", data_root, stand_in.url, "127.0.0.1", 5672) for dag_id, short in DAGS.items()}
    for env in envs.values():
        env["AIRFLOW_CONN_PRODCAT_RABBITMQ"] = json.dumps(
            {"conn_type": "generic", "host": "127.0.0.1", "port": 5672, "login": "guest", "password": "guest", "schema": VHOST}
        )
    with open(log_path, "w", encoding="utf-8") as log:
        for env in envs.values():
            subprocess.run([airflow, "db", "migrate"], env=env, check=True, stdout=log, stderr=log)
        consumer = subprocess.Popen([*cli, "consume"], cwd=REPO, stdout=log, stderr=log)
        stand_in_cpu = Sampler(cpu_seconds(stand_in.process()), SAMPLE_EVERY_S)
        print(f"{label}: {products} products seeded; running the DAGs (log: {log_path})", flush=True)
        started = time.perf_counter()
        dags: List[DagTest] = []
        try:
            dags.append(DagTest(airflow, "prodcat_categorise", {}, envs["prodcat_categorise"], log))
            if neighbours_after == "predict":
                predict_dir = dags[0].wait_for_stage(data_root, "predict")
            else:
                dags[0].wait()
                predict_dir = latest_run(data_root, "prodcat_categorise") / "predict"
            neighbours_started = time.perf_counter() - started
            conf = {"predict_dir": str(predict_dir), "preprocess_dir": str(predict_dir.parent / "preprocess")}
            dags.append(DagTest(airflow, "prodcat_visual_neighbours", conf, envs["prodcat_visual_neighbours"], log))
            for dag in dags:
                dag.wait()
            wall = time.perf_counter() - started
        finally:
            for dag in dags:
                if dag.proc.poll() is None:
                    dag.proc.terminate()
            consumer.terminate()
            consumer.wait(timeout=120)
            stand_in_cpu.stop()
    tasks = {DAGS[dag.dag_id]: task_ends(run / f"airflow-{DAGS[dag.dag_id]}", dag.dag_id) for dag in dags}
    stages: Dict[str, dict] = {}
    for dag in dags:
        stages.update(stage_figures(tasks[DAGS[dag.dag_id]], dag.sampler.samples, DAGS[dag.dag_id]))
    for name, figures in stages.items():
        print(f"  {name:<36} {figures['seconds']:7.1f} s  {figures['peak_rss_mb']} MB", flush=True)
    published = {short: read_json(str(latest_run(data_root, dag_id) / "publish" / "summary.json")) for dag_id, short in DAGS.items()}
    write_back = write_back_figures(tasks, stand_in_cpu.samples, sum(p["sent"] for p in published.values()))
    bulk_size = load_config(str(REPO / "feature_config.yaml")).publish.consumer_bulk_size
    write_back["stand_in_alone"] = stand_in_alone(stand_in.client(), predict_dir, published["categorise"], ALONE_UPDATES, bulk_size)
    print(f"{label}: {wall:.0f} s; the neighbours DAG started at {neighbours_started:.0f} s; write-back {write_back}", flush=True)
    return {
        "products": products,
        "wall_s": round(wall, 1),
        "neighbours_dag_started_s": round(neighbours_started, 1),
        "stages": stages,
        "write_back": write_back,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--catalogue", default=str(REPO.parent / "shared" / "data" / "fashion"), help="a Myntra-format catalogue folder")
    parser.add_argument("--scaling-factor", type=int, default=3, help="size of the growth run's catalogue (0: no growth run)")
    parser.add_argument(
        "--neighbours-after",
        choices=["predict", "categorise"],
        default="predict",
        help="start the neighbours DAG when predict finished (as the asset schedule does) or after the whole categorisation run",
    )
    args = parser.parse_args()
    catalogue = Path(args.catalogue).resolve()
    stand_in = PrivateStandIn("bench-dag/noida", ES_PORT)
    try:
        cold = measured_run(catalogue, stand_in, keep_cache=False, label="cold", neighbours_after=args.neighbours_after)
        warm = measured_run(catalogue, stand_in, keep_cache=True, label="warm", neighbours_after=args.neighbours_after)
        results = {
            "products": cold["products"],
            "catalogue": str(catalogue),
            "cold_s": cold["wall_s"],
            "warm_s": warm["wall_s"],
            "targets": TARGETS,
            "stages": {name: f["seconds"] for name, f in cold["stages"].items()},
            "warm_stages": {name: f["seconds"] for name, f in warm["stages"].items()},
            "peak_rss_mb": {name: f["peak_rss_mb"] for name, f in warm["stages"].items()},
            "neighbours_dag_started_s": {"cold": cold["neighbours_dag_started_s"], "warm": warm["neighbours_dag_started_s"]},
            "write_back": {"cold": cold["write_back"], "warm": warm["write_back"]},
            "measured": (
                "wall: both `airflow dags test` runs, DAG parsing included, seeding and Airflow's db migrate not; "
                + (
                    "the neighbours DAG starts when categorisation's predict folder is complete, as the scheduler triggers it "
                    "on the prodcat://predictions asset, and runs alongside categorisation's publish, wait and report; "
                    if args.neighbours_after == "predict"
                    else "the neighbours DAG starts after the categorisation run ended; "
                )
                + "stage seconds: Airflow task instances, each from the previous task's end to its own (the first "
                "from its start); "
                f"peak_rss_mb: the `airflow dags test` process tree (tasks run in it, so a stage's peak includes "
                f"what earlier stages of the DAG left allocated), sampled every {SAMPLE_EVERY_S} s; "
                "peak_rss_mb at 1x is the warm run's, the growth run's like; "
                "write_back: from categorisation's publish start to the last wait_indexed end, the updates both "
                "publishes sent, and the stand-in's CPU seconds in that span; stand_in_alone: after the run, "
                f"{ALONE_UPDATES:,} of its prediction updates sent again straight to the stand-in, one version newer, "
                "in the consumer's bulk size (the machine's stretch, for comparing runs)"
            ),
        }
        # written now and again with the growth run: what an interrupted growth run leaves is still measured
        write_results(NAME, results)
        if args.scaling_factor:
            scaled_dir = WORK / f"catalogue-x{args.scaling_factor}"
            shutil.rmtree(scaled_dir, ignore_errors=True)
            write_scaled_catalogue(catalogue, scaled_dir, args.scaling_factor)
            scaled = measured_run(
                scaled_dir, stand_in, keep_cache=True, label=f"x{args.scaling_factor}", neighbours_after=args.neighbours_after
            )
            results["scaling"] = {
                "factor": args.scaling_factor,
                "products": scaled["products"],
                "wall_s": scaled["wall_s"],
                "neighbours_dag_started_s": scaled["neighbours_dag_started_s"],
                "stages": scaled["stages"],
                "write_back": scaled["write_back"],
                "images_reused_through_cache": True,
                "note": "copies' titles shuffled with one misspelling, new ids; their images are the originals' "
                "(symlinks), served by the embedding cache the 1x runs filled, so compare with warm_stages",
            }
            write_results(NAME, results)
    finally:
        stand_in.stop()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
