"""Peak memory and time of the stages that hold data, each alone in its own process, at 1x and at
``--factor`` x the catalogue.

In ``make bench-dag`` every task runs inside one ``airflow dags test`` process, so a stage's peak
there includes what earlier stages left allocated. Here ``preprocess`` (warm embedding cache) and
``train`` each run by themselves, on a dump written straight from the catalogue's product documents
(no Elasticsearch: the dump stage is measured in bench-dag): first the catalogue, then one
:mod:`benchmarks.scaled_catalogue` ``--factor`` times its size (perturbed copies whose images are the
originals', so the cache the 1x run filled serves them). Peak RSS: the stage's process tree, sampled
every 0.2 s. An unmeasured preprocess first fills the embedding cache.

    python -m benchmarks.memory [--catalogue ../shared/data/fashion] [--factor 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.dag import Sampler, tree_rss
from benchmarks.results_file import write_results
from benchmarks.scaled_catalogue import write_scaled_catalogue
from core import storage

REPO = Path(__file__).resolve().parents[1]
NAME = "memory"
WORK = REPO / ".prodcat" / "bench-memory"
SAMPLE_EVERY_S = 0.2
STAGE_CODE = {
    "preprocess": "from pipelines.preprocess import preprocess; preprocess(cfg, f'{run}/dump', f'{run}/preprocess', cache)",
    "train": "from trainer.train import train; train(cfg, f'{run}/preprocess', f'{run}/model', 'v1', 'bench-memory')",
}


def write_dump(catalogue: Path, dump_dir: Path) -> int:
    """The catalogue's product documents as a finished dump folder (two files, like two slices)."""
    from core.taxonomy import CategoryTree
    from pipelines.dump import slice_file
    from services.catalogue import RuleLabeller, product_documents

    tree = CategoryTree.load_json(str(REPO / "data" / "fashion_categories.json"))
    labeller = RuleLabeller.from_yaml(str(REPO / "data" / "labelling_rules.yaml"), tree)
    docs = [json.dumps(d).encode() for d in product_documents(catalogue, labeller, f"file://{(catalogue / 'images').resolve()}")]
    with storage.atomic_stage(str(dump_dir)) as tmp:
        half = len(docs) // 2
        for i, part in enumerate((docs[:half], docs[half:])):
            with gzip.open(f"{tmp}/{slice_file(i, 2)}", "wb") as f:
                f.write(b"\n".join(part) + b"\n")
        storage.write_json(f"{tmp}/categories.json", tree.to_records())
    return len(docs)


def measured_stage(stage: str, run: Path, cache: Path) -> dict:
    """Runs ``stage`` in a fresh Python process (it replaces its output folder, as a rerun task
    does); its wall seconds and the tree's peak RSS."""
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING); from core.config import load_config; "
        f"cfg = load_config('{REPO / 'feature_config.yaml'}'); run, cache = '{run}', '{cache}'; {STAGE_CODE[stage]}"
    )
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(tree_rss(child.pid), SAMPLE_EVERY_S)
    _, err = child.communicate()
    sampler.stop()
    if child.returncode:
        raise RuntimeError(f"{stage} failed: {err[-2000:]}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(max(r for _, r in sampler.samples) / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--catalogue", default=str(REPO.parent / "shared" / "data" / "fashion"))
    parser.add_argument("--factor", type=int, default=3)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    cache = WORK / "embedding_cache"
    catalogues = {"1x": Path(args.catalogue)}
    catalogues[f"{args.factor}x"] = WORK / f"catalogue-x{args.factor}"
    write_scaled_catalogue(catalogues["1x"], catalogues[f"{args.factor}x"], args.factor)
    products = {size: write_dump(path, WORK / size / "dump") for size, path in catalogues.items()}
    measured_stage("preprocess", WORK / "1x", cache)  # fills the embedding cache
    stages = {}
    for stage in ("preprocess", "train"):
        stages[stage] = {size: measured_stage(stage, WORK / size, cache) for size in catalogues}
        for size, figures in stages[stage].items():
            print(f"{stage:<11} {size:>3}  {figures['seconds']:7.1f} s  {figures['peak_rss_mb']:6d} MB", flush=True)
    write_results(
        NAME,
        {
            "products": products,
            "stages": stages,
            "measured": "each stage alone in a fresh process (`python -c`), warm embedding cache; peak_rss_mb: "
            f"its process tree, sampled every {SAMPLE_EVERY_S} s; the larger catalogue's copies reuse the originals' images",
        },
    )


if __name__ == "__main__":
    main()
