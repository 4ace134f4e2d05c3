"""The report's neighbours section: how often a product's visual neighbours share its true
category (overall and by rank), and a gallery of a sample of products with their top
neighbours' photos, fetched by the products' image URLs and inlined as small JPEG thumbnails."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
from typing import Any, Dict, List, Optional

import numpy as np

from core.rows import read_clean_rows
from core.taxonomy import CategoryTree
from pipelines.neighbours import read_neighbours
from services import image_fetch

log = logging.getLogger(__name__)

THUMBNAIL_PX = 128
SAMPLE_PRODUCTS = 8
NEIGHBOURS_SHOWN = 6


def thumbnail(url: str, timeout_s: float = 5.0) -> Optional[str]:
    """A ``data:`` URI of a small JPEG of the image at ``url``; None where it cannot be had."""
    from PIL import Image, UnidentifiedImageError

    if not url:
        return None
    try:
        with Image.open(io.BytesIO(image_fetch.fetch_image(url, timeout_s, retries=1))) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=80)
    except (image_fetch.ImageFetchError, UnidentifiedImageError, OSError) as e:
        log.warning("report: no thumbnail for %s: %s", url, e)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _sample(ids: List[str], count: int) -> List[str]:
    """A stable sample: the ids with the smallest hashes (the same products in every run)."""
    return sorted(ids, key=lambda pid: hashlib.sha256(pid.encode()).hexdigest())[:count]


def neighbours_section(
    neighbours_dir: str, preprocess_dir: str, tree: CategoryTree, ground_truth_field: str, group_level: int
) -> Dict[str, Any]:
    """Same-category shares and the gallery of one neighbours stage."""
    products = {r["id"]: r for r in read_clean_rows(preprocess_dir, columns=["id", "title", "image_url", ground_truth_field])}
    found = {r["id"]: r["neighbours"] for r in read_neighbours(neighbours_dir)}

    leaf = {pid: r.get(ground_truth_field) if r.get(ground_truth_field) in tree else None for pid, r in products.items()}
    group = {pid: next(iter(tree.at_level(tree.closure([c]), group_level)), None) if c else None for pid, c in leaf.items()}
    k = max((len(n) for n in found.values()), default=0)
    same = np.zeros(k)
    seen = np.zeros(k)
    shares, group_shares = [], []
    for pid, neighbours in found.items():
        if leaf.get(pid) is None or not neighbours:
            continue
        hits = np.array([leaf.get(n["id"]) == leaf[pid] for n in neighbours], dtype=float)
        same[: len(hits)] += hits
        seen[: len(hits)] += 1
        shares.append(hits.mean())
        group_shares.append(np.mean([group.get(n["id"]) == group[pid] for n in neighbours]))
    with_neighbours = [pid for pid, n in found.items() if n]
    gallery = []
    for pid in _sample(with_neighbours, SAMPLE_PRODUCTS):
        query = products.get(pid, {})
        shown = []
        for n in found[pid][:NEIGHBOURS_SHOWN]:
            other = products.get(n["id"], {})
            shown.append(
                {
                    "id": n["id"],
                    "title": other.get("title", ""),
                    "score": n["score"],
                    "same_category": leaf.get(pid) is not None and leaf.get(n["id"]) == leaf[pid],
                    "image": thumbnail(other.get("image_url", "")),
                }
            )
        gallery.append(
            {
                "id": pid,
                "title": query.get("title", ""),
                "true_category": leaf.get(pid),
                "image": thumbnail(query.get("image_url", "")),
                "neighbours": shown,
            }
        )
    return {
        "products": len(found),
        "with_neighbours": len(with_neighbours),
        "k": k,
        "same_category_share": float(np.mean(shares)) if shares else None,
        "same_group_share": float(np.mean(group_shares)) if group_shares else None,
        "group_level": group_level,
        "share_by_rank": (same / np.maximum(seen, 1))[seen > 0].tolist(),
        "gallery": gallery,
    }
