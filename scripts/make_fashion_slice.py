"""Copies a small, deterministic slice of the shared fashion catalogue into data/fashion_slice.

Usage: python scripts/make_fashion_slice.py ../shared/data/fashion data/fashion_slice
"""

import csv
import hashlib
import shutil
import sys
from pathlib import Path

WITH_IMAGE, WITHOUT_IMAGE = 320, 80


def main(src: Path, dst: Path) -> None:
    with open(src / "styles.csv", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [r for r in reader if len(r) == len(header)]
    images = {p.stem for p in (src / "images").glob("*.jpg")}
    rows.sort(key=lambda r: hashlib.sha256(r[0].encode()).hexdigest())
    chosen = [r for r in rows if r[0] in images][:WITH_IMAGE] + [r for r in rows if r[0] not in images][:WITHOUT_IMAGE]
    (dst / "images").mkdir(parents=True, exist_ok=True)
    with open(dst / "styles.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(chosen)
    for r in chosen:
        if r[0] in images:
            shutil.copyfile(src / "images" / f"{r[0]}.jpg", dst / "images" / f"{r[0]}.jpg")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
