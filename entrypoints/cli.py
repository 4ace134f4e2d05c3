"""``prodcat``: the command line entry point (seeding, services, single stages, the demo run)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import webbrowser
from pathlib import Path
from typing import IO, List, Optional, Tuple

from services.publish import RabbitConnection
from services.search_index import EsConnection

REPO = Path(__file__).resolve().parents[1]
SLICE = REPO / "data" / "fashion_slice"
RULES = REPO / "data" / "labelling_rules.yaml"
TREE = REPO / "data" / "fashion_categories.json"
# the names of entrypoints.tasks.TASKS, which tests/test_dag.py checks; importing it here would load Beam for every command
STAGES = (
    "dump",
    "preprocess",
    "validate_statistics",
    "train",
    "evaluate",
    "predict",
    "write_review",
    "import_labels",
    "publish_predictions",
    "neighbours",
    "publish_neighbours",
    "wait_indexed",
    "report",
)


def _es(args: argparse.Namespace) -> EsConnection:
    return EsConnection(url=args.es_url, username=os.environ.get("PRODCAT_ES_USER"), password=os.environ.get("PRODCAT_ES_PASSWORD"))


def _rabbit(args: argparse.Namespace) -> RabbitConnection:
    return RabbitConnection(
        host=args.rabbit_host,
        port=args.rabbit_port,
        virtual_host=args.rabbit_vhost,
        username=os.environ.get("PRODCAT_RABBIT_USER", "guest"),
        password=os.environ.get("PRODCAT_RABBIT_PASSWORD", "guest"),
    )


def cmd_seed(args: argparse.Namespace) -> None:
    from core.taxonomy import CategoryTree
    from services.catalogue import RuleLabeller, product_documents
    from services.search_index import seed_catalogue

    catalogue = Path(args.catalogue)
    tree = CategoryTree.load_json(args.tree)
    labeller = RuleLabeller.from_yaml(args.rules, tree)
    docs = product_documents(catalogue, labeller, args.image_base_url, limit=args.limit)
    n = seed_catalogue(_es(args).client(), docs, tree, args.products_index, args.categories_index)
    print(json.dumps({"seeded_products": n, "categories": len(tree)}))


def cmd_serve_images(args: argparse.Namespace) -> None:
    from services.image_server import make_server

    server = make_server(str(Path(args.catalogue) / "images"), args.host, args.port)
    logging.info("serving %s on http://%s:%d", args.catalogue, args.host, args.port)
    server.serve_forever()


def cmd_consume(args: argparse.Namespace) -> None:
    from core.config import load_config
    from services.consumer import Consumer, ConsumerSettings

    p = load_config(args.config).publish
    settings = ConsumerSettings(
        queue=p.queue,
        dead_letter_queue=p.dead_letter_queue,
        index=args.products_index,
        bulk_size=p.consumer_bulk_size,
        flush_s=p.consumer_flush_s,
        rate_limit_docs_per_s=args.rate_limit if args.rate_limit is not None else p.consumer_rate_limit_docs_per_s,
        prefetch=p.consumer_prefetch,
        concurrency=p.consumer_concurrency,
        idle_exit_s=args.idle_exit_s,
    )
    stats = Consumer(_rabbit(args), _es(args).client(), settings).run()
    print(json.dumps(stats))


def cmd_replay(args: argparse.Namespace) -> None:
    from core.config import load_config
    from pipelines.writeback import replay_dead_letters

    p = load_config(args.config).publish
    counts = replay_dead_letters(
        _rabbit(args), p.queue, p.dead_letter_queue, run_id=args.run_id, reason_contains=args.reason_contains, batch_size=p.batch_size
    )
    print(json.dumps(counts))


def cmd_stage(args: argparse.Namespace) -> None:
    from core.config import LOCAL_BEAM_RUNNER
    from entrypoints import tasks

    settings = tasks.RunSettings(
        data_root=args.data_root,
        run_id=args.run_id,
        version=args.version,
        config_path=args.config,
        dag_id=args.dag_id,
        products_index=args.products_index,
        categories_index=args.categories_index,
        es=_es(args),
        rabbit=_rabbit(args),
        model_type=args.model_type,
        limit=args.limit,
        beam_args=tuple([f"--runner={LOCAL_BEAM_RUNNER}", *args.beam_arg]),
    )
    print(tasks.TASKS[args.stage](settings, *args.paths))


def cmd_labels_import(args: argparse.Namespace) -> None:
    """Imports a CSV of human labels; prints the counts and each bad row with its reason, and
    exits 1 where some rows were bad (the good ones are imported)."""
    from core.config import load_config
    from pipelines.dump import dump_tree
    from pipelines.human_labels import import_labels

    with open(args.file, encoding="utf-8-sig") as f:
        text = f.read()
    es = _es(args).client()
    summary = import_labels(
        es, args.products_index, load_config(args.config).labels.human_field, text, dump_tree(es, args.categories_index)
    )
    print(json.dumps(summary, indent=1))
    if summary["bad_rows"]:
        sys.exit(1)


def airflow_env(airflow_home: Path, data_root: str, es_url: str, rabbit_host: str, rabbit_port: int) -> dict:
    """Environment for a local Airflow: SQLite metadata, this repo's DAGs, prodcat's connections."""
    host, _, port = es_url.split("://", 1)[1].partition(":")
    return {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_VAR_PRODCAT_DATA_ROOT": data_root,
        "AIRFLOW_CONN_PRODCAT_ELASTICSEARCH": json.dumps({"conn_type": "generic", "host": host, "port": int(port or 9200)}),
        "AIRFLOW_CONN_PRODCAT_RABBITMQ": json.dumps(
            {"conn_type": "generic", "host": rabbit_host, "port": rabbit_port, "login": "guest", "password": "guest"}
        ),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def latest_run(data_root: str, dag_id: str) -> Path:
    return max(Path(data_root, "runs", dag_id).iterdir(), key=lambda p: p.stat().st_mtime)


def task_timings(airflow_home: Path, dag_id: str) -> List[Tuple[str, str, float]]:
    """``(task, state, seconds)`` of the latest run of ``dag_id``, in task order, from the local
    Airflow's SQLite metadata database (what ``airflow_env`` sets up)."""
    with contextlib.closing(sqlite3.connect(airflow_home / "airflow.db")) as db:
        return db.execute(
            "SELECT task_id, state, COALESCE(duration, 0) FROM task_instance WHERE dag_id = ? AND run_id = "
            "(SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1) ORDER BY start_date",
            (dag_id, dag_id),
        ).fetchall()


def print_stages(airflow_home: Path, dag_id: str, run: Path) -> None:
    """One line per task of the DAG's latest run: name, its stage's counts, seconds."""
    from pipelines.report.overview import TASK_STAGES, stage_summaries

    counts = stage_summaries(str(run))
    print(f"{dag_id}  ({run})")
    for task_id, state, seconds in task_timings(airflow_home, dag_id):
        text = "report/index.html" if task_id == "report" else counts.get(TASK_STAGES.get(task_id, ""), "")
        if state != "success":
            text = f"{state} {text}"
        print(f"  {task_id:<20} {text:<72} {seconds:6.1f} s")


def run_dags(env: dict, data_root: str, conf: dict, run_after: str, log: Optional[IO] = None) -> Tuple[Path, Path]:
    """Both DAGs with ``airflow dags test``, chained as the scheduler chains them through the
    predictions asset; returns their run folders. With ``log``, Airflow's output goes there and
    one line per task is printed instead."""
    airflow = [str(Path(sys.executable).parent / "airflow")]
    home = Path(env["AIRFLOW_HOME"])
    output = {"stdout": log, "stderr": subprocess.STDOUT} if log else {}
    subprocess.run(airflow + ["db", "migrate"], env=env, check=True, stdout=log or subprocess.DEVNULL, stderr=log)
    subprocess.run(airflow + ["dags", "test", "prodcat_categorise", run_after, "--conf", json.dumps(conf)], env=env, check=True, **output)
    categorised = latest_run(data_root, "prodcat_categorise")
    if log:
        print_stages(home, "prodcat_categorise", categorised)
    neighbours_conf = {"predict_dir": str(categorised / "predict"), "preprocess_dir": str(categorised / "preprocess")}
    subprocess.run(
        airflow + ["dags", "test", "prodcat_visual_neighbours", run_after, "--conf", json.dumps(neighbours_conf)],
        env=env,
        check=True,
        **output,
    )
    neighbours_run = latest_run(data_root, "prodcat_visual_neighbours")
    if log:
        print_stages(home, "prodcat_visual_neighbours", neighbours_run)
    return categorised, neighbours_run


def print_report(es_url: str, run: str, neighbours_run: str, products_index: str) -> None:
    """Evaluation figures, three example products and where the reports are, in a few lines."""
    from core import storage

    es = EsConnection(url=es_url).client()
    metrics = storage.read_json(storage.join(run, "evaluation", "metrics.json"))
    for against in ("rule_labels", "ground_truth"):
        m = metrics[against]
        levels = " / ".join(f"{v['micro_f1']:.3f}" for _, v in sorted(m.get("levels", {}).items()))
        print(
            f"test vs {against:<12} {m['examples']} products: precision@1 {m.get('precision_at_1', 0):.3f}, "
            f"hierarchical F1 {m.get('hierarchical_f1', 0):.3f}, micro-F1 per level {levels}"
        )
    with_neighbours = {"bool": {"filter": [{"exists": {"field": "neighbours_run_id"}}, {"exists": {"field": "image_url"}}]}}
    for hit in es.search(index=products_index, query=with_neighbours, size=3, sort=[{"id": "asc"}])["hits"]["hits"]:
        doc = hit["_source"]
        print(f"{doc['id']}: {doc['title']!r} (true: {doc['true_category']})")
        print("  predicted:", ", ".join(f"{c['id']} {c['score']:.2f}" for c in doc.get("predicted_categories", [])))
        neighbours = doc.get("visual_neighbours", {}).get("ids", [])
        ids = neighbours[:3]
        titles = {d["_id"]: d["_source"]["title"] for d in es.mget(index=products_index, ids=ids)["docs"] if d.get("found")} if ids else {}
        print(f"  {len(neighbours)} neighbours, first: {'; '.join(titles.get(i, i) for i in ids)}")
    print("reports (prodcat report RUN_DIR --open):")
    for folder in (run, neighbours_run):
        print(f"  {storage.join(folder, 'report', 'index.html')}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Seeds the catalogue, serves its images, runs the consumer and both DAGs, reports. Unless
    ``--verbose``, the services' and Airflow's logs go to a file and one line per task is printed."""
    from services.image_server import make_server

    work = Path(args.work_dir).resolve()
    data_root = str(work / "data")
    log_path = work / "logs" / "demo.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log_file:
        log = None if args.show_logs else log_file
        if log:
            print(f"full logs: {log_path} (--verbose prints them here)")
        server = make_server(str(Path(args.catalogue) / "images"), "127.0.0.1", args.image_port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        common = ["--es-url", args.es_url, "--rabbit-host", args.rabbit_host, "--rabbit-port", str(args.rabbit_port)]
        started = time.perf_counter()
        seeded = subprocess.run(
            [
                sys.executable,
                "-m",
                "entrypoints.cli",
                *common,
                "seed",
                "--catalogue",
                args.catalogue,
                "--image-base-url",
                f"http://127.0.0.1:{args.image_port}",
            ],
            check=True,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        counts = json.loads(seeded.stdout)
        text = f"{counts['seeded_products']} products, {counts['categories']} categories"
        print(f"{'seed':<22} {text:<72} {time.perf_counter() - started:6.1f} s")
        consumer = subprocess.Popen([sys.executable, "-m", "entrypoints.cli", *common, "consume"], stdout=log, stderr=log)
        try:
            env = airflow_env(work / "airflow", data_root, args.es_url, args.rabbit_host, args.rabbit_port)
            runs = run_dags(env, data_root, {"model_type": args.model_type}, args.run_after, log)
        except subprocess.CalledProcessError:
            if log:
                log.flush()
                print("failed; the log's last lines:\n" + "".join(log_path.read_text(encoding="utf-8").splitlines(True)[-30:]))
            raise
        finally:
            consumer.terminate()
            consumer.wait(timeout=120)
            server.shutdown()
    print_report(args.es_url, str(runs[0]), str(runs[1]), "products")
    print(f"main job wall time: {time.perf_counter() - started:.0f}s")


def cmd_report(args: argparse.Namespace) -> None:
    """Prints the path of a run folder's report, rendering it first where it is missing (or
    with ``--rebuild``); ``--open`` shows it in the default browser (a local copy for gs://)."""
    from core import storage
    from core.config import load_config
    from pipelines.report.build import REPORT_FILE, write_report

    run_dir = args.run_dir.rstrip("/")
    path = storage.join(run_dir, "report", REPORT_FILE)
    if args.rebuild or not storage.exists(path):
        path = write_report(load_config(args.config), run_dir, storage.join(run_dir, "report"))
    print(path)
    if args.open:
        local = Path(path)
        if storage.is_remote(path):
            with storage.open_read(path) as f, tempfile.NamedTemporaryFile("wb", suffix=".html", delete=False) as out:
                out.write(f.read())
            local = Path(out.name)
        webbrowser.open(local.resolve().as_uri())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prodcat", description=__doc__)
    parser.add_argument("--es-url", default="http://127.0.0.1:9200")
    parser.add_argument("--rabbit-host", default="127.0.0.1")
    parser.add_argument("--rabbit-port", type=int, default=5672)
    parser.add_argument("--rabbit-vhost", default="/")
    parser.add_argument("--config", default=str(REPO / "feature_config.yaml"))
    parser.add_argument("--products-index", default="products")
    parser.add_argument("--categories-index", default="categories")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("seed", help="index a Myntra-format catalogue and its category tree, with rule labels")
    p.add_argument("--catalogue", default=str(SLICE))
    p.add_argument("--rules", default=str(RULES))
    p.add_argument("--tree", default=str(TREE), help="category tree JSON (id, name, parent, level)")
    p.add_argument("--image-base-url", default="http://127.0.0.1:8765")
    p.add_argument("--limit", type=int)
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("serve-images", help="serve a catalogue's images on loopback")
    p.add_argument("--catalogue", default=str(SLICE))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.set_defaults(func=cmd_serve_images)

    p = sub.add_parser("consume", help="RabbitMQ -> Elasticsearch consumer (runs until SIGTERM)")
    p.add_argument("--rate-limit", type=float, help="documents/s (default: from the config)")
    p.add_argument("--idle-exit-s", type=float, help="exit after this many seconds without messages")
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser("replay-dead-letters", help="move dead letters back to the update queue after a fix")
    p.add_argument("--run-id", help="only the dead letters of this run")
    p.add_argument("--reason-contains", help="only dead letters whose reason contains this text (e.g. http_404)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("stage", help="run one stage of a run outside Airflow")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("paths", nargs="*", help="the stage's input folders, as the DAG passes them")
    p.add_argument("--data-root", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--dag-id", default="prodcat_categorise", help="the DAG whose run folder this is")
    p.add_argument("--version", type=int, required=True, help="update version; newer wins in Elasticsearch")
    p.add_argument("--model-type")
    p.add_argument("--limit", type=int)
    p.add_argument("--beam-arg", action="append", default=[])
    p.set_defaults(func=cmd_stage)

    labels = sub.add_parser("labels", help="human labels").add_subparsers(dest="labels_command", required=True)
    p = labels.add_parser("import", help="import a CSV (header: id,category) of human labels into the products index")
    p.add_argument("file")
    p.set_defaults(func=cmd_labels_import)

    p = sub.add_parser("demo", help="seed, run the whole DAG with a consumer, print a report")
    p.add_argument("--catalogue", default=str(SLICE))
    p.add_argument("--work-dir", default=str(REPO / ".prodcat" / "demo"))
    p.add_argument("--image-port", type=int, default=8765)
    p.add_argument("--model-type", default="wide_deep")
    p.add_argument("--run-after", default="2026-11-22T00:00:00+00:00")
    p.add_argument("--verbose", dest="show_logs", action="store_true", help="print the services' and Airflow's logs")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="a run folder's HTML report (rendered where missing)")
    p.add_argument("run_dir", help="<data_root>/runs/<dag_id>/<run>, local or gs://")
    p.add_argument("--open", action="store_true", help="open it in the default browser")
    p.add_argument("--rebuild", action="store_true", help="render it again from the run's stages")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # a line per HTTP request or AMQP handshake would bury the report
        for chatty in ("elastic_transport", "pika"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    args.func(args)


if __name__ == "__main__":
    main()
