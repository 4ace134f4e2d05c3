"""``prodcat``: the command line entry point (seeding, services, single stages, the demo run)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

from pipelines.publish import RabbitConnection
from pipelines.search_index import EsConnection

REPO = Path(__file__).resolve().parents[1]
SLICE = REPO / "data" / "fashion_slice"
RULES = REPO / "data" / "labelling_rules.yaml"
TREE = REPO / "data" / "fashion_categories.json"
STAGES = ("dump", "preprocess", "validate_statistics", "train", "evaluate", "predict", "publish_predictions",
          "neighbours", "publish_neighbours", "wait_indexed")


def _es(args: argparse.Namespace) -> EsConnection:
    return EsConnection(url=args.es_url, username=os.environ.get("PRODCAT_ES_USER"), password=os.environ.get("PRODCAT_ES_PASSWORD"))


def _rabbit(args: argparse.Namespace) -> RabbitConnection:
    return RabbitConnection(host=args.rabbit_host, port=args.rabbit_port, virtual_host=args.rabbit_vhost,
                            username=os.environ.get("PRODCAT_RABBIT_USER", "guest"),
                            password=os.environ.get("PRODCAT_RABBIT_PASSWORD", "guest"))


def cmd_seed(args: argparse.Namespace) -> None:
    from pipelines.catalogue import RuleLabeller, product_documents
    from pipelines.search_index import seed_catalogue
    from pipelines.taxonomy import CategoryTree

    catalogue = Path(args.catalogue)
    tree = CategoryTree.load_json(args.tree)
    labeller = RuleLabeller.from_yaml(args.rules, tree)
    docs = product_documents(catalogue, labeller, args.image_base_url, limit=args.limit)
    n = seed_catalogue(_es(args).client(), docs, tree, args.products_index, args.categories_index)
    print(json.dumps({"seeded_products": n, "categories": len(tree)}))


def cmd_serve_images(args: argparse.Namespace) -> None:
    from pipelines.image_server import make_server

    server = make_server(str(Path(args.catalogue) / "images"), args.host, args.port)
    logging.info("serving %s on http://%s:%d", args.catalogue, args.host, args.port)
    server.serve_forever()


def cmd_consume(args: argparse.Namespace) -> None:
    from pipelines.config import load_config
    from pipelines.consumer import Consumer, ConsumerSettings

    p = load_config(args.config).publish
    settings = ConsumerSettings(
        queue=p.queue, dead_letter_queue=p.dead_letter_queue, index=args.products_index,
        bulk_size=p.consumer_bulk_size, flush_s=p.consumer_flush_s,
        rate_limit_docs_per_s=args.rate_limit if args.rate_limit is not None else p.consumer_rate_limit_docs_per_s,
        prefetch=p.consumer_prefetch, idle_exit_s=args.idle_exit_s,
    )
    stats = Consumer(_rabbit(args), _es(args).client(), settings).run()
    print(json.dumps(stats))


def cmd_stage(args: argparse.Namespace) -> None:
    from pipelines import tasks

    settings = tasks.RunSettings(
        data_root=args.data_root, run_id=args.run_id, version=args.version, config_path=args.config, dag_id=args.dag_id,
        products_index=args.products_index, categories_index=args.categories_index,
        es=_es(args), rabbit=_rabbit(args), model_type=args.model_type, limit=args.limit,
        beam_args=tuple(["--runner=DirectRunner", *args.beam_arg]),
    )
    print(getattr(tasks, args.stage)(settings, *args.paths))


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
        "AIRFLOW_CONN_PRODCAT_RABBITMQ": json.dumps({"conn_type": "generic", "host": rabbit_host, "port": rabbit_port, "login": "guest", "password": "guest"}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def latest_run(data_root: str, dag_id: str) -> Path:
    return max(Path(data_root, "runs", dag_id).iterdir(), key=lambda p: p.stat().st_mtime)


def run_dags(env: dict, data_root: str, conf: dict, run_after: str) -> Tuple[Path, Path]:
    """Both DAGs with ``airflow dags test``, chained as the scheduler chains them through the
    predictions asset; returns their run folders."""
    airflow = [str(Path(sys.executable).parent / "airflow")]
    subprocess.run(airflow + ["db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(airflow + ["dags", "test", "prodcat_categorise", run_after, "--conf", json.dumps(conf)], env=env, check=True)
    categorised = latest_run(data_root, "prodcat_categorise")
    neighbours_conf = {"predict_dir": str(categorised / "predict"), "preprocess_dir": str(categorised / "preprocess")}
    subprocess.run(airflow + ["dags", "test", "prodcat_visual_neighbours", run_after, "--conf", json.dumps(neighbours_conf)],
                   env=env, check=True)
    return categorised, latest_run(data_root, "prodcat_visual_neighbours")


def print_report(es_url: str, run: str, neighbours_run: str, products_index: str) -> None:
    from pipelines import storage

    es = EsConnection(url=es_url).client()
    report = {
        "runs": [run, neighbours_run],
        "dump": storage.read_json(storage.join(run, "dump", "summary.json")),
        "preprocess": storage.read_json(storage.join(run, "preprocess", "summary.json"))["counters"],
        "neighbours": storage.read_json(storage.join(neighbours_run, "neighbours", "summary.json"))["counters"],
        "published": {"predictions": storage.read_json(storage.join(run, "publish", "summary.json")),
                      "neighbours": storage.read_json(storage.join(neighbours_run, "publish", "summary.json"))},
    }
    metrics = storage.read_json(storage.join(run, "evaluation", "metrics.json"))
    for against in ("rule_labels", "ground_truth"):
        m = metrics[against]
        report[f"test_vs_{against}"] = {
            "examples": m["examples"],
            "precision_at_1": round(m.get("precision_at_1", 0), 3),
            "hierarchical_f1": round(m.get("hierarchical_f1", 0), 3),
            "micro_f1_per_level": {lvl: round(v["micro_f1"], 3) for lvl, v in m.get("levels", {}).items()},
        }
    print(json.dumps(report, indent=1))
    hits = es.search(index=products_index, query={"exists": {"field": "visual_neighbours.id"}}, size=3, sort=[{"id": "asc"}])["hits"]["hits"]
    for hit in hits:
        doc = hit["_source"]
        print(f"\n{doc['id']}: {doc['title']!r} (true: {doc['true_category']}; rules: {doc.get('rule_categories')})")
        print("  predicted:", ", ".join(f"{c['id']} {c['score']:.2f}" for c in doc.get("predicted_categories", [])))
        print("  attributes:", {k: v["value"] for k, v in (doc.get("predicted_attributes") or {}).items()})
        titles = {}
        ids = [n["id"] for n in doc.get("visual_neighbours", [])[:5]]
        if ids:
            titles = {d["_id"]: d["_source"]["title"] for d in es.mget(index=products_index, ids=ids)["docs"] if d.get("found")}
        print(f"  {len(doc.get('visual_neighbours', []))} neighbours, first:", [f"{titles.get(i, i)}" for i in ids])


def cmd_demo(args: argparse.Namespace) -> None:
    """Seeds the catalogue, serves its images, runs the consumer and both DAGs, reports."""
    from pipelines.image_server import make_server

    work = Path(args.work_dir).resolve()
    data_root = str(work / "data")
    server = make_server(str(Path(args.catalogue) / "images"), "127.0.0.1", args.image_port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    common = ["--es-url", args.es_url, "--rabbit-host", args.rabbit_host, "--rabbit-port", str(args.rabbit_port)]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.cli", *common, "seed", "--catalogue", args.catalogue,
                    "--image-base-url", f"http://127.0.0.1:{args.image_port}"], check=True)
    consumer = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *common, "consume"])
    try:
        env = airflow_env(work / "airflow", data_root, args.es_url, args.rabbit_host, args.rabbit_port)
        runs = run_dags(env, data_root, {"model_type": args.model_type}, args.run_after)
    finally:
        consumer.terminate()
        consumer.wait(timeout=120)
        server.shutdown()
    print_report(args.es_url, str(runs[0]), str(runs[1]), "products")
    print(f"\nmain job wall time: {time.perf_counter() - started:.0f}s")


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

    p = sub.add_parser("demo", help="seed, run the whole DAG with a consumer, print a report")
    p.add_argument("--catalogue", default=str(SLICE))
    p.add_argument("--work-dir", default=str(REPO / ".prodcat" / "demo"))
    p.add_argument("--image-port", type=int, default=8765)
    p.add_argument("--model-type", default="wide_deep")
    p.add_argument("--run-after", default="2026-11-22T00:00:00+00:00")
    p.set_defaults(func=cmd_demo)
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
