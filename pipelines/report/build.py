"""Gathers a run folder's sections and renders them with the Jinja2 template into one HTML file.

A categorisation run's report has the overview, model card, evaluation and data sections. A
neighbours run's report has its neighbours section and, from the categorisation run whose
predictions it used (named in its neighbours summary), the same sections as that run's report.
A stage that did not finish leaves its section out, so a report always renders.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Dict, Optional

import jinja2

from core import storage
from core.config import FeatureConfig
from core.taxonomy import CategoryTree
from pipelines.report import data, evaluation, gallery, plots
from pipelines.report.overview import read_stage_json, stage_summaries

REPORT_FILE = "index.html"
REPORT_STAGE = "report"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipelines.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v, digits=1: "–" if v is None else f"{100 * v:.{digits}f}%"
    env.filters["num"] = lambda v, digits=3: "–" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.{digits}f}")
    return env


def blessing_reason(decision: Dict[str, Any]) -> str:
    """Why the blessing gate decided as it did, in words."""
    metric, value, previous = decision["metric"], decision["value"], decision.get("previous")
    if decision.get("forced"):
        return f"forced by the run's force_publish param ({metric} {value:.3f})"
    if previous is None:
        return f"no model was blessed before; this one starts the line ({metric} {value:.3f})"
    if previous["model_dir"] == decision["model_dir"]:
        return "this model was already the blessed one (a rerun)"
    if decision["blessed"]:
        return f"{metric} {value:.3f} is at least the blessed model's {previous['value']:.3f} ({previous.get('model_version')})"
    return (
        f"{metric} {value:.3f} is below the blessed model's {previous['value']:.3f}; predictions came from {previous.get('model_version')}"
    )


def model_card_section(run_dir: str) -> Optional[Dict[str, Any]]:
    card = read_stage_json(run_dir, "model", "model_card.json")
    if card is None:
        return None
    decision = read_stage_json(run_dir, "evaluation", "blessing.json")
    thresholds = card["thresholds"]
    return {
        "version": card["model_version"],
        "run_id": card["run_id"],
        "model": card["model"],
        "config_json": json.dumps(card["config"], indent=1, sort_keys=True),
        "thresholds": {
            "count": len(thresholds),
            "min": min(thresholds),
            "median": sorted(thresholds)[len(thresholds) // 2],
            "max": max(thresholds),
        },
        "train_examples_per_s": card["train_examples_per_s"],
        "history_plot": plots.training_history(card["history"]) if card["history"] else None,
        "blessing": decision and {**decision, "reason": blessing_reason(decision)},
    }


def evaluation_section(run_dir: str, tree: CategoryTree) -> Optional[Dict[str, Any]]:
    evaluation_dir = storage.join(run_dir, "evaluation")
    if not storage.is_complete(evaluation_dir):
        return None
    metrics = evaluation.read_metrics(evaluation_dir)
    test = evaluation.load_test_scores(evaluation_dir, tree)
    rows = evaluation.level_rows(metrics, test)
    section: Dict[str, Any] = {
        "examples": metrics.get("examples", 0),
        "levels": rows,
        "level_plot": plots.level_f1(rows),
        "attributes": metrics.get("attributes", {}),
        "categories": None,
    }
    if test is not None and test.ground_truth.any():
        curves = evaluation.pr_curves(test, level=min(2, tree.levels))
        calibration = evaluation.reliability(test)
        section.update(
            {
                "categories": evaluation.category_rows(test),
                "pr_plot": plots.pr_curves(curves) if curves else None,
                "confusions": evaluation.top_confusions(test),
                "reliability": calibration,
                "reliability_plot": plots.reliability(calibration["bins"], calibration["ece"]),
            }
        )
    return section


def data_section(run_dir: str) -> Optional[Dict[str, Any]]:
    statistics_dir = storage.join(run_dir, "statistics")
    preprocess_dir = storage.join(run_dir, "preprocess")
    if not storage.is_complete(preprocess_dir):
        return None
    section: Dict[str, Any] = {
        "dead_letters": data.dead_letters(preprocess_dir),
        "statistics": None,
        "counters": read_stage_json(run_dir, "preprocess", "summary.json")["counters"],
    }
    if storage.is_complete(statistics_dir):
        stats = data.statistics_comparison(statistics_dir)
        section["statistics"] = {**stats, "missing_plot": plots.missing_rates(stats["features"])}
    return section


def _relative_link(target: str, from_dir: str) -> str:
    return target if storage.is_remote(target) else os.path.relpath(target, from_dir)


def gather(cfg: FeatureConfig, run_dir: str, out_dir: str) -> Dict[str, Any]:
    """The template's context for ``run_dir``'s report, to be written into ``out_dir``."""
    neighbours_summary = read_stage_json(run_dir, "neighbours", "summary.json")
    categorisation_dir = run_dir
    context: Dict[str, Any] = {
        "run_dir": run_dir,
        "dag_id": posixpath.basename(posixpath.dirname(run_dir.rstrip("/"))),
        "run_name": posixpath.basename(run_dir.rstrip("/")),
        "neighbours": None,
        "categorisation_report": None,
    }
    if neighbours_summary is not None:
        categorisation_dir = posixpath.dirname(neighbours_summary["preprocess_dir"].rstrip("/"))
        context["categorisation_report"] = _relative_link(storage.join(categorisation_dir, REPORT_STAGE, REPORT_FILE), out_dir)
    context["categorisation_dir"] = categorisation_dir
    runs = [categorisation_dir] if categorisation_dir == run_dir else [categorisation_dir, run_dir]
    context["stages"] = [
        {"run": posixpath.basename(posixpath.dirname(folder.rstrip("/"))), "stage": stage, "counts": counts}
        for folder in runs
        for stage, counts in stage_summaries(folder).items()
    ]
    preprocess_dir = storage.join(categorisation_dir, "preprocess")
    categories_path = storage.join(preprocess_dir, "categories.json")
    tree = CategoryTree.from_records(storage.read_json(categories_path)) if storage.exists(categories_path) else None
    context["model_card"] = model_card_section(categorisation_dir)
    context["evaluation"] = evaluation_section(categorisation_dir, tree) if tree else None
    context["data"] = data_section(categorisation_dir)
    if neighbours_summary is not None and tree is not None:
        section = gallery.neighbours_section(
            storage.join(run_dir, "neighbours"), preprocess_dir, tree, cfg.labels.ground_truth_field, neighbours_summary["group_level"]
        )
        context["neighbours"] = {
            **section,
            "rank_plot": plots.share_by_rank(section["share_by_rank"]) if section["share_by_rank"] else None,
        }
    return context


def render(context: Dict[str, Any]) -> str:
    return _environment().get_template("report.html.j2").render(**context)


def write_report(cfg: FeatureConfig, run_dir: str, out_dir: str) -> str:
    """Renders ``run_dir``'s report into the stage folder ``out_dir``; returns the report file's path."""
    html = render(gather(cfg, run_dir, out_dir))
    with storage.atomic_stage(out_dir) as tmp:
        with storage.open_write(storage.join(tmp, REPORT_FILE)) as f:
            f.write(html.encode("utf-8"))
    return storage.join(out_dir, REPORT_FILE)
