"""What every benchmark writes beside its figures: the machine, the date, an atomic results file."""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(name: str, result: dict[str, Any] | list[dict[str, Any]]) -> Path:
    """Writes ``results/<name>.json`` through a rename, with ``machine`` and ``date`` added (to
    each row where the result is a list of rows)."""
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"machine": {"cores": os.cpu_count(), "cpu": cpu_model()}, "date": date.today().isoformat()}
    full = [{**row, **stamp} for row in result] if isinstance(result, list) else {**result, **stamp}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(full, indent=1))
    tmp.replace(path)
    return path
