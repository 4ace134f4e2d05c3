"""Few-shot benchmark: new categories from K human labels, without retraining.

Trains the configured model once on the rule labels of the train split (as the pipeline does),
then simulates the labelling loop: for each level-3 category that no rule can emit, K products
of the train split get a human label (K = 1, 5, 20; all of them where the category has fewer),
and the configured few-shot classifier (trainer/fewshot.py; the other one is reported beside
it) categorises the test split beside the multi-label model. Reports, on the test split only, against ground truth: micro-F1 on the new
categories and overall level-3 micro-F1; recall@k / precision@k of same-category retrieval
(test queries, train corpus); and same-category precision@10 of visual neighbours with the CNN
image embedding and with the learned embedding. The k-NN space is compared with its learned
part alone and its raw part alone. The probe's C and ``fewshot.rule_examples`` were chosen on the
eval split (K = 5), never on test.

    python -m benchmarks.fewshot --preprocess-dir .prodcat/bench/data/runs/prodcat_categorise/bench/preprocess

Ground truth picks the simulated human labels (train split) and scores the test split; it is
never a training label. Every figure it writes is measured in that call.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from benchmarks.quality import level_summary
from benchmarks.results_file import write_results
from core import storage
from core.config import FEWSHOT_CLASSIFIERS, FeatureConfig, load_config
from core.rows import RULE_CATEGORIES, read_clean_rows
from core.taxonomy import CategoryTree
from services.catalogue import RuleLabeller
from trainer.fewshot import PROBE, apply_matches, build_prototypes, fit_probe, group_examples, match, match_probe, normalise
from trainer.hierarchy import decide
from trainer.metrics import evaluate_predictions, truth_matrix
from trainer.serving import EMBEDDING, METRIC_EMBEDDING, ServingModel, raw_batch

REPO = Path(__file__).resolve().parents[1]
NAME = "fewshot"
SHOTS = (1, 5, 20)
KS = (1, 5, 10)
TARGETS = {"k": 5, "new_categories_f1": 0.70, "level_3_micro_f1": 0.90}


def new_categories(tree: CategoryTree, rules_path: Path, present: Sequence[str]) -> List[str]:
    """Level-3 categories of the catalogue that no rule can emit."""
    labeller = RuleLabeller.from_yaml(str(rules_path), tree)
    emitted = {r.category for r in labeller.rules}
    return sorted({c for c in present if c in tree and tree.level_of(c) == tree.levels and c not in emitted})


def embed(cfg: FeatureConfig, model: ServingModel, rows: Sequence[dict], batch_size: int = 1024) -> Dict[str, np.ndarray]:
    parts: Dict[str, List[np.ndarray]] = {}
    for i in range(0, len(rows), batch_size):
        out = model.predict(raw_batch(cfg, rows[i : i + batch_size]))
        for key in ("category_scores", EMBEDDING, METRIC_EMBEDDING):
            parts.setdefault(key, []).append(out[key])
    return {k: np.concatenate(v) for k, v in parts.items()}


def spaces(out: Dict[str, np.ndarray], metric_dim: int) -> Dict[str, np.ndarray]:
    """The k-NN space (learned + raw), its learned part alone and its raw part alone."""
    return {
        "embedding": out[EMBEDDING],
        "metric_only": out[METRIC_EMBEDDING],
        "raw_only": normalise(out[EMBEDDING][:, metric_dim:]),
    }


def micro_f1(truth: np.ndarray, positive: np.ndarray) -> float:
    tp, fp, fn = (truth & positive).sum(), (~truth & positive).sum(), (truth & ~positive).sum()
    return float(2 * tp / max(2 * tp + fp + fn, 1))


def fewshot_run(
    cfg: FeatureConfig,
    tree: CategoryTree,
    k: int,
    seed: int,
    new: Sequence[str],
    train_rows: Sequence[dict],
    train_emb: np.ndarray,
    test_scores: np.ndarray,
    test_emb: np.ndarray,
    test_known: np.ndarray,
    thresholds: np.ndarray,
    truth: np.ndarray,
    classifier: str,
) -> dict:
    """One simulated round: K human labels per new category, the few-shot ``classifier``
    (probe or prototypes) fitted on them, decisions on test."""
    truth_field = cfg.labels.ground_truth_field
    rng = np.random.default_rng(seed)
    by_category: Dict[str, List[int]] = {}
    for i, r in enumerate(train_rows):
        if r[truth_field] in new:
            by_category.setdefault(r[truth_field], []).append(i)
    shots = {c: sorted(rng.permutation(idx)[:k].tolist()) for c, idx in by_category.items()}
    human_labels: List = [None] * len(train_rows)
    for c, idx in shots.items():
        for i in idx:
            human_labels[i] = c
    taken: Dict[str, int] = {}
    rule_labels: List = [None] * len(train_rows)
    for i, r in enumerate(train_rows):
        finest = [c for c in r[RULE_CATEGORIES] or [] if tree.level_of(c) == tree.levels]
        if human_labels[i] is None and len(finest) == 1 and taken.get(finest[0], 0) < cfg.fewshot.rule_examples:
            taken[finest[0]] = taken.get(finest[0], 0) + 1
            rule_labels[i] = finest[0]
    f = cfg.fewshot
    human, rules = group_examples(train_emb, human_labels), group_examples(train_emb, rule_labels)
    started = time.perf_counter()
    prototypes = build_prototypes(human, rules, f.min_examples, f.min_similarity, f.threshold_margin)
    if classifier == PROBE:
        matches = match_probe(fit_probe(prototypes, human, rules, f.probe_c), prototypes, test_emb, test_known, tree)
    else:
        matches = match(prototypes, test_emb, test_known, tree)
    fit_seconds = time.perf_counter() - started
    positive, closed = decide(test_scores, thresholds, tree, test_known)
    positive, closed = apply_matches(positive, closed, matches, prototypes, tree)
    cols = [tree.index[c] for c in new]
    metrics = evaluate_predictions(closed, positive, truth, tree)
    return {
        "new_categories_f1": round(micro_f1(truth[:, cols], positive[:, cols]), 4),
        "level_3_micro_f1": round(float(metrics["levels"][str(tree.levels)]["micro_f1"]), 4),
        "levels": level_summary(metrics),
        "human_labels": sum(len(v) for v in shots.values()),
        "categories_with_labels": len(shots),
        "decided_by_fewshot": int(matches.decides.sum()),
        "fit_and_match_seconds": round(fit_seconds, 1),
    }


def retrieval(queries: np.ndarray, query_labels: np.ndarray, corpus: np.ndarray, corpus_labels: np.ndarray, ks: Sequence[int]) -> dict:
    """Same-category retrieval by cosine: recall@k (a query with at least one same-category item
    in its k nearest) and precision@k (share of the k nearest of its category)."""
    top = max(ks)
    hits = []
    for start in range(0, len(queries), 1024):
        sims = queries[start : start + 1024].astype(np.float32) @ corpus.T.astype(np.float32)
        nearest = np.argpartition(-sims, top, axis=1)[:, :top]
        order = np.take_along_axis(nearest, np.argsort(-np.take_along_axis(sims, nearest, axis=1), axis=1), axis=1)
        hits.append(corpus_labels[order] == query_labels[start : start + 1024, None])
    same = np.concatenate(hits) if hits else np.zeros((0, top), dtype=bool)
    out = {}
    for k in ks:
        out[f"recall_at_{k}"] = round(float(same[:, :k].any(axis=1).mean()), 4)
        out[f"precision_at_{k}"] = round(float(same[:, :k].mean()), 4)
    out["queries"] = int(len(queries))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preprocess-dir", required=True)
    parser.add_argument("--work-dir", default=str(REPO / ".prodcat" / "bench" / "fewshot"))
    parser.add_argument("--rules", default=str(REPO / "data" / "labelling_rules.yaml"))
    parser.add_argument("--seed", type=int, default=42, help="training seed and seed of the simulated labels")
    parser.add_argument("--reuse-model", action="store_true", help="use the model a previous call trained into --work-dir")
    args = parser.parse_args()

    from trainer.evaluate import evaluate_model
    from trainer.train import train

    cfg = load_config(REPO / "feature_config.yaml").replace_model(seed=args.seed)
    truth_field = cfg.labels.ground_truth_field
    tree = CategoryTree.from_records(storage.read_json(storage.join(args.preprocess_dir, "categories.json")))
    model_dir = os.path.join(args.work_dir, f"{cfg.model.type}-seed{args.seed}")
    started = time.perf_counter()
    if args.reuse_model:
        card = storage.read_json(os.path.join(model_dir, "model_card.json"))
    else:
        card = train(cfg, args.preprocess_dir, model_dir, f"bench-fewshot-{args.seed}", "bench")
    train_seconds = None if args.reuse_model else round(time.perf_counter() - started, 1)
    quality = evaluate_model(cfg, model_dir, args.preprocess_dir)
    model = ServingModel.load(model_dir)

    rows = list(read_clean_rows(args.preprocess_dir))
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    new = new_categories(tree, Path(args.rules), [r[truth_field] for r in rows])
    started = time.perf_counter()
    train_out, test_out = embed(cfg, model, train_rows), embed(cfg, model, test_rows)
    embed_seconds = time.perf_counter() - started
    train_spaces, test_spaces = spaces(train_out, cfg.embedding.dim), spaces(test_out, cfg.embedding.dim)
    truth = truth_matrix(tree, [[r[truth_field]] for r in test_rows])
    test_known = model.known_labels(test_rows)

    def rounds(space: str, classifier: str) -> Dict[int, dict]:
        out = {}
        for k in SHOTS:
            out[k] = fewshot_run(
                cfg,
                tree,
                k,
                args.seed,
                new,
                train_rows,
                train_spaces[space],
                test_out["category_scores"],
                test_spaces[space],
                test_known,
                model.thresholds,
                truth,
                classifier,
            )
            print(
                space,
                classifier,
                k,
                json.dumps({key: out[k][key] for key in ("new_categories_f1", "level_3_micro_f1", "decided_by_fewshot")}),
            )
        return out

    by_space = {space: rounds(space, cfg.fewshot.classifier) for space in train_spaces}
    by_classifier = {c: by_space["embedding"] if c == cfg.fewshot.classifier else rounds("embedding", c) for c in FEWSHOT_CLASSIFIERS}

    train_labels = np.array([r[truth_field] for r in train_rows])
    test_labels = np.array([r[truth_field] for r in test_rows])
    new_queries = np.isin(test_labels, new)
    emb_train, emb_test = train_spaces["embedding"], test_spaces["embedding"]
    with_image_train = np.array([bool(r["has_image"]) for r in train_rows])
    with_image_test = np.array([bool(r["has_image"]) for r in test_rows])

    def cnn(rs: Sequence[dict]) -> np.ndarray:
        return normalise(np.stack([np.asarray(r["image_embedding"], dtype=np.float32) for r in rs]))

    image_train = [r for r in train_rows if r["has_image"]]
    image_test = [r for r in test_rows if r["has_image"]]
    neighbours = {
        "cnn": retrieval(cnn(image_test), test_labels[with_image_test], cnn(image_train), train_labels[with_image_train], (10,))[
            "precision_at_10"
        ],
        "metric": retrieval(
            test_spaces["metric_only"][with_image_test],
            test_labels[with_image_test],
            train_spaces["metric_only"][with_image_train],
            train_labels[with_image_train],
            (10,),
        )["precision_at_10"],
        "embedding": retrieval(
            emb_test[with_image_test], test_labels[with_image_test], emb_train[with_image_train], train_labels[with_image_train], (10,)
        )["precision_at_10"],
        "queries": int(with_image_test.sum()),
    }
    five = by_space["embedding"][TARGETS["k"]]
    result = {
        "k_shots": {k: {key: v[key] for key in ("new_categories_f1", "level_3_micro_f1")} for k, v in by_space["embedding"].items()},
        "k_shots_detail": by_space["embedding"],
        "k_shots_by_classifier": {
            c: {k: {key: v[key] for key in ("new_categories_f1", "level_3_micro_f1")} for k, v in runs.items()}
            for c, runs in by_classifier.items()
        },
        "k_shots_by_space": {
            space: {k: {key: v[key] for key in ("new_categories_f1", "level_3_micro_f1")} for k, v in runs.items()}
            for space, runs in by_space.items()
        },
        "retrieval": retrieval(emb_test, test_labels, emb_train, train_labels, KS),
        "retrieval_new_categories": retrieval(emb_test[new_queries], test_labels[new_queries], emb_train, train_labels, KS),
        "retrieval_by_space": {
            space: retrieval(test_spaces[space], test_labels, train_spaces[space], train_labels, KS)
            for space in ("metric_only", "raw_only")
        },
        "neighbours_precision_at_10": neighbours,
        "targets": TARGETS,
        "meets_targets": five["new_categories_f1"] >= TARGETS["new_categories_f1"]
        and five["level_3_micro_f1"] >= TARGETS["level_3_micro_f1"],
        "model_without_prototypes": {
            "levels": level_summary(quality["ground_truth"]),
            "hierarchical_f1": round(quality["ground_truth"]["hierarchical_f1"], 4),
            "seed": args.seed,
        },
        "retrained": False,
        "new_categories": len(new),
        "new_category_test_products": int(new_queries.sum()),
        "embedding": {"dim": int(emb_train.shape[1]), "learned_dim": cfg.embedding.dim, "raw_dim_per_part": cfg.embedding.raw_dim},
        "fewshot_config": {
            "classifier": cfg.fewshot.classifier,
            "probe_c": cfg.fewshot.probe_c,
            "min_similarity": cfg.fewshot.min_similarity,
            "threshold_margin": cfg.fewshot.threshold_margin,
            "rule_examples": cfg.fewshot.rule_examples,
        },
        "train_seconds": train_seconds,
        "model_trained_in_this_call": not args.reuse_model,
        "epochs": len(card["history"]["loss"]),
        "embed_seconds": round(embed_seconds, 1),
        "split": {"train": len(train_rows), "test": len(test_rows)},
    }
    write_results(NAME, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("k_shots_detail",)}, indent=1))


if __name__ == "__main__":
    main()
