"""Preprocessing benchmark on a dump of the full fashion catalogue: rows/s of the Beam + TFT
pipeline for text and categorical features, images/s of the image encoder (JPEG decode included)
on each runtime side by side with the cosine of its embeddings to eager PyTorch float32's on the
same images, and a plain pandas + scikit-learn ``TfidfVectorizer`` baseline on the same text
features in the same run.

    python -m benchmarks.preprocess --dump-dir .prodcat/bench/data/runs/prodcat_categorise/bench/dump --images ../shared/data/fashion/images
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.results_file import write_results
from core.config import LOCAL_BEAM_RUNNER, ImageInput, load_config
from pipelines.images import MAX_BATCH_SIZE, decode_image, load_encoder

REPO = Path(__file__).resolve().parents[1]
NAME = "preprocess"
RUNTIME_KEYS = {"torch": "torch_float32", "onnxruntime": "onnxruntime"}
# DirectRunner: FnApiRunner named directly would not hand the options to its worker processes
MULTI_PROCESSING = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=0"]  # 0: one per core


def beam_text_rows_per_s(dump_dir: str, beam_args: list) -> tuple:
    from pipelines.preprocess import preprocess

    cfg = load_config(REPO / "feature_config.yaml")
    no_image = dataclasses.replace(cfg, inputs=tuple(i for i in cfg.inputs if i.kind != "image"))
    out = tempfile.mkdtemp(prefix="bench-pre-")
    try:
        started = time.perf_counter()
        summary = preprocess(no_image, dump_dir, os.path.join(out, "pre"), os.path.join(out, "cache"), beam_args)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows = sum(v for k, v in summary["counters"].items() if k.startswith("valid_"))
    return rows, rows / seconds, seconds


def sklearn_rows_per_s(dump_dir: str) -> tuple:
    import pandas as pd
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import OneHotEncoder

    started = time.perf_counter()
    frame = pd.concat(
        pd.read_json(p, lines=True, compression="gzip", dtype={"id": str}) for p in glob.glob(f"{dump_dir}/products-*.jsonl.gz")
    )
    titles = frame["title"].fillna("").str.lower()
    TfidfVectorizer(max_features=20000).fit_transform(titles)
    brand = titles.str.extract(r"^(.*?)\s+(?:men|women|boys|girls|unisex|kids)\b", expand=False).fillna(titles.str.split().str[0])
    OneHotEncoder(handle_unknown="ignore").fit_transform(pd.DataFrame({"brand": brand.fillna(""), "gender": frame["gender"].fillna("")}))
    seconds = time.perf_counter() - started
    return len(frame) / seconds, seconds


def images_per_s(paths: list, runtime: str, batch: int) -> tuple:
    """Images/s of decode + embed on ``runtime`` (the model loaded and one batch run beforehand),
    and the embeddings."""
    encoder = load_encoder(ImageInput(name="image", source="image_url", runtime=runtime))
    encoder.embed([decode_image(open(p, "rb").read()) for p in paths[:batch]])
    embeddings = []
    started = time.perf_counter()
    for start in range(0, len(paths), batch):
        embeddings.append(encoder.embed([decode_image(open(p, "rb").read()) for p in paths[start : start + batch]]))
    seconds = time.perf_counter() - started
    return len(paths) / seconds, seconds, np.concatenate(embeddings)


def decodes_per_s(paths: list) -> float:
    """JPEG decode (+ resize where needed) alone, from bytes already read."""
    datas = [open(p, "rb").read() for p in paths]
    started = time.perf_counter()
    for data in datas:
        decode_image(data)
    return len(datas) / (time.perf_counter() - started)


def image_results(image_dir: str, count: int, batch: int) -> dict:
    """Eager PyTorch float32 (the reference) and the configured runtime on the same images."""
    import torch

    chosen = load_config(REPO / "feature_config.yaml").image.runtime
    paths = sorted(glob.glob(os.path.join(image_dir, "*.jpg")))[:count]
    result = {
        "image_runtime": chosen,
        "image_batch_size": batch,
        "images_timed": len(paths),
        "image_decode_per_s": round(decodes_per_s(paths), 1),
        "torch_threads": torch.get_num_threads(),
    }
    reference = None
    for runtime in ("torch", chosen):
        rate, seconds, embeddings = images_per_s(paths, runtime, batch)
        reference = embeddings if reference is None else reference
        cos = (embeddings * reference).sum(axis=1) / np.linalg.norm(embeddings, axis=1) / np.linalg.norm(reference, axis=1)
        key = RUNTIME_KEYS[runtime]
        result[f"images_per_s_{key}"] = round(rate, 2)
        result[f"image_seconds_{key}"] = round(seconds, 1)
        result[f"image_cosine_to_torch_float32_{key}"] = {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}
    result["images_per_s"] = result[f"images_per_s_{RUNTIME_KEYS[chosen]}"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dump-dir", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--image-count", type=int, default=512)
    parser.add_argument("--image-batch", type=int, default=MAX_BATCH_SIZE)
    parser.add_argument("--beam-arg", action="append", default=[])
    args = parser.parse_args()
    beam_args = [f"--runner={LOCAL_BEAM_RUNNER}", *args.beam_arg]
    products, rows_per_s, beam_seconds = beam_text_rows_per_s(args.dump_dir, beam_args)
    _, mp_rows_per_s, mp_seconds = beam_text_rows_per_s(args.dump_dir, beam_args + MULTI_PROCESSING)
    sk_rows_per_s, sk_seconds = sklearn_rows_per_s(args.dump_dir)
    images = image_results(args.images, args.image_count, args.image_batch)
    result = {
        "products": products,
        "rows_per_s": round(rows_per_s, 1),
        "beam_seconds": round(beam_seconds, 1),
        "beam_args": beam_args,
        "rows_per_s_multi_processing": round(mp_rows_per_s, 1),
        "beam_seconds_multi_processing": round(mp_seconds, 1),
        "multi_processing_args": MULTI_PROCESSING,
        **images,
        "sklearn_rows_per_s": round(sk_rows_per_s, 1),
        "sklearn_seconds": round(sk_seconds, 1),
        "prodcat_to_sklearn_ratio": round(rows_per_s / sk_rows_per_s, 3),
        "note": "Beam rows/s covers the whole text+categorical pipeline: read, validate, dead letters, Parquet, "
        "TFXIO, TFT analyse + transform, TFRecord write; the sklearn baseline only fits TF-IDF and one-hot in memory.",
    }
    write_results(NAME, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
