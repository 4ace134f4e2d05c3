"""Neighbours benchmark: recall@100 and wall time of prodcat's search versus exact numpy search and
faiss (HNSW, IVF) on clustered synthetic vectors and on the real fashion image embeddings.

Recall is measured on a fixed sample of queries against exact search. Time is build time plus
the time to answer every product's query. prodcat answers all of them (it searches a group's
products leaf by leaf) and is timed in full; for the others, where answering all of them would take
hours on this machine (exact search at 100k+), the per-query time of the sample is multiplied out,
and the row says so (``extrapolated``). ``prodcat_partitioned`` is prodcat's search for groups
above ``brute_force_below`` run on a dataset below it, to show its recall on the real embeddings.

    python -m benchmarks.neighbours [--sizes 10000 100000] [--real PATH_TO_CLEAN_PARQUET_DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from benchmarks.results_file import write_results
from core.config import Neighbours
from pipelines.neighbours import neighbour_blocks, normalise

K = 100
NAME = "neighbours"


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clusters = max(10, n // 1000)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        chunk = centres[rng.integers(0, clusters, stop - start)] + 0.7 * rng.normal(size=(stop - start, dim)).astype(np.float32)
        # Normalised chunk by chunk: at 1M x 1280 one more full-size copy is 5 GB.
        out[start:stop] = normalise(chunk)[0]
    return out


def exact(unit: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for start in range(0, len(queries), 512):
        sims = queries[start : start + 512] @ unit.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth)]))


def timed_queries(search, queries: np.ndarray, n: int) -> tuple:
    started = time.perf_counter()
    found = search(queries)
    per_query = (time.perf_counter() - started) / len(queries)
    return found, per_query * n


def run_dataset(
    name: str, unit: np.ndarray, sample: int, methods: List[str], settings: Neighbours, hnsw_max_n: int, skipped: List[Dict]
) -> List[Dict]:
    import faiss

    n, dim = unit.shape
    rng = np.random.default_rng(1)
    qidx = rng.choice(n, size=min(sample, n), replace=False)
    queries = unit[qidx]
    rows = []

    def row(method, rec, seconds, extrapolated):
        r = {
            "dataset": name,
            "n": n,
            "dim": dim,
            "method": method,
            "recall_at_100": round(rec, 4),
            "seconds": round(seconds, 2),
            "queries_timed": len(queries),
            "extrapolated": extrapolated,
        }
        print(json.dumps(r), flush=True)
        rows.append(r)

    found, seconds = timed_queries(lambda q: exact(unit, q, K + 1), queries, n)
    truth = found[:, 1:]  # the query itself comes first
    row("exact", 1.0, seconds, len(queries) < n)

    def prodcat(method: str, settings: Neighbours) -> None:  # every product's query, timed in full
        started = time.perf_counter()
        found = np.full((n, K + 1), -1, dtype=np.int64)
        for block_rows, neighbours, _ in neighbour_blocks(unit, K + 1, settings):
            found[block_rows, : neighbours.shape[1]] = neighbours
        row(method, recall([f[f != q][:K] for f, q in zip(found[qidx], qidx)], truth), time.perf_counter() - started, False)

    if "prodcat" in methods:
        prodcat("prodcat", settings)
    if "prodcat" in methods and n < settings.brute_force_below:
        # what the partitioned search (used above brute_force_below) gives on the same vectors
        prodcat("prodcat_partitioned", dataclasses.replace(settings, brute_force_below=0))
    if "faiss_hnsw" in methods and n > hnsw_max_n:
        skipped.append(
            {
                "dataset": name,
                "n": n,
                "method": "faiss_hnsw",
                "why": f"graph construction above {hnsw_max_n} vectors of {dim} dimensions does not fit this machine's time budget",
            }
        )
    elif "faiss_hnsw" in methods:
        started = time.perf_counter()
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(unit)
        index.hnsw.efSearch = 256
        build = time.perf_counter() - started
        found, seconds = timed_queries(lambda q: index.search(q, K + 1)[1], queries, n)
        row("faiss_hnsw", recall(found[:, 1:], truth), build + seconds, len(queries) < n)
        del index
    if "faiss_ivf" in methods:
        started = time.perf_counter()
        nlist = max(16, int(4 * np.sqrt(n)))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(unit[rng.choice(n, size=min(n, 50 * nlist), replace=False)])
        index.add(unit)
        index.nprobe = max(1, nlist // 10)
        build = time.perf_counter() - started
        found, seconds = timed_queries(lambda q: index.search(q, K + 1)[1], queries, n)
        row("faiss_ivf", recall(found[:, 1:], truth), build + seconds, len(queries) < n)
    return rows


def real_embeddings(clean_dir: str) -> Optional[np.ndarray]:
    import pyarrow.parquet as pq

    files = glob.glob(os.path.join(clean_dir, "*.parquet"))
    if not files:
        return None
    table = pq.read_table(files, columns=["has_image", "image_embedding"]).to_pylist()
    vectors = np.asarray([r["image_embedding"] for r in table if r["has_image"]], dtype=np.float32)
    return normalise(vectors)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--sample", type=int, default=1000)
    parser.add_argument("--methods", nargs="*", default=["prodcat", "faiss_hnsw", "faiss_ivf"])
    parser.add_argument("--real", help="a preprocess stage's clean/ folder with image embeddings")
    parser.add_argument("--hnsw-max-n", type=int, default=200_000, help="skip faiss HNSW above this size (its build time)")
    args = parser.parse_args()
    from core.config import load_config

    settings = load_config(Path(__file__).resolve().parents[1] / "feature_config.yaml").neighbours
    rows: List[Dict] = []
    skipped: List[Dict] = []
    if args.real:
        unit = real_embeddings(args.real)
        if unit is not None:
            rows += run_dataset("fashion_efficientnet_lite0", unit, args.sample, args.methods, settings, args.hnsw_max_n, skipped)
    for n in args.sizes:
        rows += run_dataset("clustered_synthetic", clustered(n, args.dim), args.sample, args.methods, settings, args.hnsw_max_n, skipped)
    write_results(NAME, rows)
    write_results(
        f"{NAME}.meta",
        {
            "skipped": skipped,
            "settings": {
                "k": K,
                "brute_force_below": settings.brute_force_below,
                "leaf_size": settings.leaf_size,
                "target_recall": settings.target_recall,
                "recall_queries": settings.recall_queries,
            },
        },
    )


if __name__ == "__main__":
    main()
