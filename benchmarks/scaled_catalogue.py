"""A catalogue ``factor`` times the size of a Myntra-format one, for the DAG benchmark's growth run:
the original products plus ``factor - 1`` perturbed copies of each (title words shuffled, one
misspelling, a new id). A copy's image is a symlink to its original's, so the embedding cache
(keyed by content hash) serves it without embedding it again.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from services.catalogue import read_styles


def perturbed_title(title: str, seed: str) -> str:
    """``title`` with its words in a shuffled order and two different adjacent letters of one word
    swapped (a misspelling; never the first letter), both drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    words = title.split()
    rng.shuffle(words)
    swaps = [(i, j) for i, w in enumerate(words) for j in range(1, len(w) - 1) if w[j] != w[j + 1]]
    if swaps:
        i, j = rng.choice(swaps)
        w = words[i]
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def write_scaled_catalogue(source: Path, target: Path, factor: int) -> int:
    """Writes ``target/styles.csv`` and ``target/images/`` (symlinks): every product of ``source``,
    then copy ``c`` (1 .. factor-1) of each with id ``id + c * 10**digits`` (``digits`` of the
    largest id, so new ids never meet old ones) and a perturbed title. Returns the product count."""
    rows = list(read_styles(source / "styles.csv"))
    offset = 10 ** len(str(max(int(r["id"]) for r in rows)))
    images = target / "images"
    images.mkdir(parents=True, exist_ok=True)
    with open(target / "styles.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for copy in range(factor):
            for row in rows:
                pid = str(int(row["id"]) + copy * offset)
                title = row["productDisplayName"] if copy == 0 else perturbed_title(row["productDisplayName"], f"{row['id']}-{copy}")
                writer.writerow({**row, "id": pid, "productDisplayName": title})
                image = (source / "images" / f"{row['id']}.jpg").resolve()
                link = images / f"{pid}.jpg"
                if image.exists() and not link.is_symlink():
                    link.symlink_to(image)
    return len(rows) * factor
