"""The report's plots (matplotlib, no pyplot state), each returned as a ``data:`` PNG URI."""

from __future__ import annotations

import base64
import io
from typing import Any, Dict, List, Sequence

import numpy as np
from matplotlib.figure import Figure

MODEL_COLOUR = "#2a6f97"
RULES_COLOUR = "#c8553d"
PREVIOUS_COLOUR = "#9aa5b1"


def to_data_uri(fig: Figure) -> str:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def level_f1(rows: List[Dict[str, Any]]) -> str:
    """Grouped bars of micro-F1 per level against ground truth: the model beside the rules."""
    against_truth = [r for r in rows if r["against"] == "ground truth"]
    levels = sorted({lvl for r in against_truth for lvl in r["levels"]})
    fig = Figure(figsize=(5.5, 3))
    ax = fig.subplots()
    width = 0.8 / max(len(against_truth), 1)
    colours = {"model": MODEL_COLOUR, "rules": RULES_COLOUR}
    for i, row in enumerate(against_truth):
        values = [row["levels"].get(lvl, {}).get("micro_f1", 0.0) for lvl in levels]
        bars = ax.bar(np.arange(len(levels)) + i * width, values, width, label=row["system"], color=colours[row["system"]])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(np.arange(len(levels)) + width * (len(against_truth) - 1) / 2, [f"level {lvl}" for lvl in levels])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("micro-F1 vs ground truth")
    ax.legend(loc="lower left", fontsize=8)
    return to_data_uri(fig)


def pr_curves(curves: List[Dict[str, Any]]) -> str:
    """Small multiples of precision-recall curves, the chosen threshold marked on each."""
    cols = 3
    rows = max(1, -(-len(curves) // cols))
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, curve in zip(axes, curves):
        ax.step(curve["recall"], curve["precision"], where="post", color=MODEL_COLOUR)
        r, p = curve["threshold_point"]
        ax.plot([r], [p], "o", color=RULES_COLOUR, label=f"threshold {curve['threshold']:.2f}")
        ax.set_title(f"{curve['name']} (n={curve['support']})", fontsize=9)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.legend(loc="lower left", fontsize=7)
    for ax in axes[len(curves) :]:
        ax.axis("off")
    fig.tight_layout()
    return to_data_uri(fig)


def reliability(bins: List[Dict[str, Any]], ece: float) -> str:
    """Observed positive rate against mean score per score bin, with the cell counts below."""
    fig = Figure(figsize=(4.5, 4.2))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    top.plot([0, 1], [0, 1], "--", color=PREVIOUS_COLOUR, label="perfectly calibrated")
    top.plot([b["mean_score"] for b in bins], [b["observed"] for b in bins], "o-", color=MODEL_COLOUR, label=f"model (ECE {ece:.3f})")
    top.set_ylabel("observed positive rate")
    top.set_ylim(0, 1.02)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [b["count"] for b in bins], width=0.09, color=MODEL_COLOUR)
    bottom.set_yscale("log")
    bottom.set_xlabel("score")
    bottom.set_ylabel("cells", fontsize=8)
    bottom.set_xlim(0, 1)
    return to_data_uri(fig)


def missing_rates(features: List[Dict[str, Any]]) -> str:
    """Missing rate per feature, this run beside the previous good run."""
    names = [f["name"] for f in features if f.get("missing_rate_now") is not None]
    now = [f["missing_rate_now"] for f in features if f.get("missing_rate_now") is not None]
    before = [f.get("missing_rate_before") or 0.0 for f in features if f.get("missing_rate_now") is not None]
    fig = Figure(figsize=(5.5, 0.45 * len(names) + 1))
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y - 0.2, before, 0.4, color=PREVIOUS_COLOUR, label="previous good run")
    ax.barh(y + 0.2, now, 0.4, color=MODEL_COLOUR, label="this run")
    ax.set_yticks(y, names)
    ax.set_xlabel("missing rate")
    ax.set_xlim(0, max([*now, *before, 0.05]) * 1.2)
    ax.legend(fontsize=8)
    return to_data_uri(fig)


def share_by_rank(shares: Sequence[float]) -> str:
    """Share of neighbours in the query's true category, by neighbour rank."""
    fig = Figure(figsize=(5.5, 2.8))
    ax = fig.subplots()
    ax.plot(np.arange(1, len(shares) + 1), shares, color=MODEL_COLOUR)
    ax.set_xlabel("neighbour rank")
    ax.set_ylabel("same true category")
    ax.set_ylim(0, 1.02)
    return to_data_uri(fig)


def training_history(history: Dict[str, List[float]]) -> str:
    """Training and validation category loss per epoch."""
    fig = Figure(figsize=(4.5, 2.8))
    ax = fig.subplots()
    for name in sorted(history):
        if name.endswith("categories_loss"):
            ax.plot(np.arange(1, len(history[name]) + 1), history[name], "o-", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    return to_data_uri(fig)
