"""The one loader of ``feature_config.yaml``: YAML in, frozen typed records out.

Every other module takes a :class:`FeatureConfig` (or one of its records); nothing
else parses the file. Unknown keys are rejected with the list of allowed ones.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml

VERSIONS = (1,)  # of the file's layout; a file of another version is refused, not misread
MODEL_TYPES = ("linear", "ffn", "wide_deep")
GROUP_BY = ("predicted", "rule", "ground_truth")
FEWSHOT_CLASSIFIERS = ("probe", "prototypes")
ENCODERS = ("efficientnet_lite0",)
IMAGE_RUNTIMES = ("onnxruntime", "torch")
DERIVATIONS = ("brand_from_title",)
TOKENISERS = ("words", "char_ngrams")
THRESHOLD_LABELS = ("rules", "golden")
# Beam's in-process batch runner, the local default. Beam's DirectRunner first tries its Prism runner
# (downloading the binary from GitHub, and naming metrics differently) and falls back to this one.
# Given by name it does not hand the pipeline options to the workers of its multi-processing mode
# (--direct_running_mode=multi_processing): there, name DirectRunner.
LOCAL_BEAM_RUNNER = "FnApiRunner"
MAX_PAGE_SIZE = 10000  # Elasticsearch's default index.max_result_window caps a search's size
UPDATE_KINDS = ("predictions", "neighbours")  # what a run writes back into Elasticsearch


class ConfigError(ValueError):
    """The configuration file is malformed; the message names the offending key."""


@dataclasses.dataclass(frozen=True)
class TextInput:
    name: str
    source: str
    vocab_size: int = 10000
    oov_buckets: int = 1
    max_chars: int = 2000
    tokens: str = "words"  # words | char_ngrams (within each word, padded with spaces)
    ngram_range: Tuple[int, ...] = (1, 1)  # n-gram lengths, in words or in characters
    kind: str = "text"

    def problems(self) -> List[str]:
        """What is wrong with the record's values, one message each."""
        out = []
        if self.tokens not in TOKENISERS:
            out.append(f"inputs.{self.name}.tokens: must be one of {list(TOKENISERS)}")
        lengths = self.ngram_range
        if not (len(lengths) == 2 and 1 <= lengths[0] <= lengths[1]):
            out.append(f"inputs.{self.name}.ngram_range: must be [min, max] with 1 <= min <= max")
        return out


@dataclasses.dataclass(frozen=True)
class CategoricalInput:
    name: str
    source: str
    top_k: Optional[int] = None
    oov_buckets: int = 1
    embedding_dim: int = 8
    derive: Optional[str] = None
    kind: str = "categorical"

    def problems(self) -> List[str]:
        """What is wrong with the record's values, one message each."""
        if self.derive is not None and self.derive not in DERIVATIONS:
            return [f"inputs.{self.name}.derive: must be one of {list(DERIVATIONS)}"]
        return []


@dataclasses.dataclass(frozen=True)
class ImageInput:
    name: str
    source: str
    encoder: str = "efficientnet_lite0"
    dim: int = 1280
    weights_path: Optional[str] = None
    fetch_timeout_s: float = 10.0
    fetch_retries: int = 2
    runtime: str = "onnxruntime"  # "onnxruntime" or "torch" (eager float32)
    kind: str = "image"

    def problems(self) -> List[str]:
        """What is wrong with the record's values, one message each."""
        out = []
        if self.encoder not in ENCODERS:
            out.append(f"inputs.{self.name}.encoder: must be one of {list(ENCODERS)}")
        if self.runtime not in IMAGE_RUNTIMES:
            out.append(f"inputs.{self.name}.runtime: must be one of {list(IMAGE_RUNTIMES)}")
        return out


Input = Union[TextInput, CategoricalInput, ImageInput]
INPUT_RECORDS = {"text": TextInput, "categorical": CategoricalInput, "image": ImageInput}  # by the YAML's ``kind``


@dataclasses.dataclass(frozen=True)
class AttributeLabel:
    name: str
    source: str
    top_k: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Labels:
    levels: int
    rule_field: str
    ground_truth_field: str
    human_field: str = "human_categories"  # documents' field of human labels (imported from CSV); they beat rule labels
    attributes: Tuple[AttributeLabel, ...] = ()


@dataclasses.dataclass(frozen=True)
class Split:
    salt: str = "prodcat"
    test_percent: int = 10
    eval_percent: int = 10


@dataclasses.dataclass(frozen=True)
class Model:
    type: str = "ffn"
    hidden_units: Tuple[int, ...] = (256, 128)
    dropout: float = 0.2
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 0.001
    category_loss_weight: float = 1.0
    target_precision: Optional[float] = 0.9  # null: per-category best F1
    min_threshold: float = 0.3
    blessing_metric: str = "ground_truth.hierarchical_f1"
    train_only_labelled: bool = True
    keep_rule_labels: bool = False  # decisions keep the rules' categories and add the model's
    threshold_labels: str = "rules"  # rules | golden (ground truth of the eval split, never a training label)
    self_training_rounds: int = 0  # rounds that add confident predictions on unlabelled train products
    self_training_min_score: float = 0.9
    self_training_epochs: int = 3
    null_evidence_share: float = 0.0  # synthetic products with no known token (share of the training examples), negative everywhere
    lazy_adam: bool = False  # sparse gradients update only the batch's rows (faster; cost quality on the benchmark)
    text_dim: Optional[int] = None  # wide_deep: one table per text input this wide, shared by both parts; None: one each
    seed: int = 42


@dataclasses.dataclass(frozen=True)
class Embedding:
    """The metric embedding trained beside the category heads (trainer/model.py) and the k-NN
    space the prototype classifier and review queue use (trainer/fewshot.py)."""

    dim: int = 128  # learned part, trained with a normalised-softmax proxy loss over the finest level
    scale: float = 16.0  # inverse temperature of that softmax
    loss_weight: float = 1.0
    raw_dim: int = 128  # fixed random projection of each text bag and of the image; 0: learned part only
    metric_weight: float = 1.0  # weight of the learned part against each raw part in the k-NN space


@dataclasses.dataclass(frozen=True)
class Fewshot:
    """The few-shot classifier over the frozen embedding: categories from human labels, no retraining."""

    classifier: str = "probe"  # probe: logistic regression over the embedding; prototypes: nearest mean
    probe_c: float = 30.0  # inverse L2 strength of the probe
    min_examples: int = 1  # human-labelled products a category needs
    min_similarity: Optional[float] = None  # prototypes: cosine to the prototype; null: leave-one-out threshold
    threshold_margin: float = 0.0  # prototypes: subtracted from the leave-one-out threshold
    rule_examples: int = 50  # rule-labelled products per finest-level category that compete


@dataclasses.dataclass(frozen=True)
class Review:
    """The review queue (active learning): least certain products per run into an index."""

    index: str = "prodcat-review"
    max_per_run: int = 1000  # cap on the documents one run writes
    per_category: int = 5  # products nearest the threshold, per category
    few_examples_below: int = 5  # categories with fewer human labels than this also send their nearest products
    top_guesses: int = 3


@dataclasses.dataclass(frozen=True)
class Neighbours:
    k: int = 100
    group_level: int = 2
    group_by: str = "predicted"
    brute_force_below: int = 40000
    query_chunk: int = 4096
    leaf_size: int = 1000
    target_recall: float = 0.97
    recall_queries: int = 200


@dataclasses.dataclass(frozen=True)
class Dump:
    """How the dump reads the products index: point in time + ``search_after`` pages."""

    page_size: int = 10000
    slices: int = 1


@dataclasses.dataclass(frozen=True)
class Publish:
    queue: str = "prodcat.updates"
    dead_letter_queue: str = "prodcat.updates.dead"
    batch_size: int = 500
    workers: int = 2
    consumer_bulk_size: int = 500
    consumer_flush_s: float = 2.0
    consumer_rate_limit_docs_per_s: float = 2000.0
    consumer_prefetch: int = 1500
    consumer_concurrency: int = 2
    reconcile_poke_s: float = 10.0
    reconcile_count_max_s: float = 60.0
    reconcile_stall_pokes: int = 3
    reconcile_attempts: int = 3
    reconcile_timeout_s: float = 7200.0
    skip_unchanged: Tuple[str, ...] = ("neighbours",)


@dataclasses.dataclass(frozen=True)
class Validation:
    """Thresholds of the statistics check before training (see pipelines.statistics)."""

    on_anomaly: str = "fail"
    min_rows: int = 1
    default_max_missing_rate: float = 0.5
    max_missing_rate: Dict[str, float] = dataclasses.field(default_factory=dict)
    max_missing_rate_increase: float = 0.1
    max_vocabulary_change: float = 0.5
    max_row_change: float = 0.5
    max_labelled_rate_drop: float = 0.2


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    version: int
    inputs: Tuple[Input, ...]
    labels: Labels
    split: Split = Split()
    model: Model = Model()
    embedding: Embedding = Embedding()
    fewshot: Fewshot = Fewshot()
    review: Review = Review()
    neighbours: Neighbours = Neighbours()
    dump: Dump = Dump()
    publish: Publish = Publish()
    validation: Validation = Validation()

    def inputs_of(self, kind: str) -> Tuple[Input, ...]:
        return tuple(i for i in self.inputs if i.kind == kind)

    @property
    def image(self) -> Optional[ImageInput]:
        images = self.inputs_of("image")
        return images[0] if images else None  # type: ignore[return-value]

    def replace_model(self, **changes: Any) -> FeatureConfig:
        """A copy with some model settings changed (e.g. a DAG run's model type)."""
        model = _build(Model, {**dataclasses.asdict(self.model), **changes}, "model")
        cfg = dataclasses.replace(self, model=model)
        _validate(cfg)
        return cfg


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if hint is int and not float(value).is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    return value


def _build(cls: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    return cls(**values)


def _build_input(raw: Any, where: str) -> Input:
    if not isinstance(raw, Mapping) or raw.get("kind") not in INPUT_RECORDS:
        raise ConfigError(f"{where}.kind: must be one of {list(INPUT_RECORDS)}")
    return _build(INPUT_RECORDS[raw["kind"]], raw, where)


def _validate(cfg: FeatureConfig) -> None:
    names = [i.name for i in cfg.inputs] + [a.name for a in cfg.labels.attributes]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"names used twice (a field is an input or a label, never both): {duplicated}")
    label_sources = {cfg.labels.rule_field, cfg.labels.human_field, cfg.labels.ground_truth_field} | {
        a.source for a in cfg.labels.attributes
    }
    clash = sorted(label_sources & {i.source for i in cfg.inputs})
    if clash:
        raise ConfigError(f"fields used as both input and label: {clash}")
    if len(cfg.inputs_of("image")) > 1:
        raise ConfigError("inputs: at most one image input is supported")
    checks = [
        (cfg.version in VERSIONS, f"version: must be one of {list(VERSIONS)}"),
        (cfg.model.type in MODEL_TYPES, f"model.type: must be one of {list(MODEL_TYPES)}"),
        (cfg.neighbours.group_by in GROUP_BY, f"neighbours.group_by: must be one of {list(GROUP_BY)}"),
        (1 <= cfg.neighbours.group_level <= cfg.labels.levels, "neighbours.group_level: must be within labels.levels"),
        (cfg.neighbours.leaf_size >= 2, "neighbours.leaf_size: must be >= 2"),
        (0 < cfg.neighbours.target_recall <= 1, "neighbours.target_recall: must be in (0, 1]"),
        (cfg.neighbours.recall_queries >= 1, "neighbours.recall_queries: must be >= 1"),
        (0 < cfg.split.test_percent < 100 and 0 < cfg.split.eval_percent < 100, "split: percents must be in (0, 100)"),
        (cfg.model.target_precision is None or 0 < cfg.model.target_precision <= 1, "model.target_precision: must be in (0, 1] or null"),
        (cfg.model.threshold_labels in THRESHOLD_LABELS, f"model.threshold_labels: must be one of {list(THRESHOLD_LABELS)}"),
        (cfg.model.self_training_rounds >= 0, "model.self_training_rounds: must be >= 0"),
        (cfg.model.text_dim is None or cfg.model.text_dim >= 1, "model.text_dim: must be >= 1 or null"),
        (0 <= cfg.model.null_evidence_share < 1, "model.null_evidence_share: must be in [0, 1)"),
        (0 < cfg.model.self_training_min_score <= 1, "model.self_training_min_score: must be in (0, 1]"),
        (cfg.embedding.dim > 0 and cfg.embedding.raw_dim >= 0, "embedding: dim must be > 0 and raw_dim >= 0"),
        (cfg.fewshot.min_examples >= 1, "fewshot.min_examples: must be >= 1"),
        (cfg.fewshot.classifier in FEWSHOT_CLASSIFIERS, f"fewshot.classifier: must be one of {list(FEWSHOT_CLASSIFIERS)}"),
        (cfg.fewshot.probe_c > 0, "fewshot.probe_c: must be > 0"),
        (cfg.review.max_per_run >= 0 and cfg.review.per_category >= 0, "review: max_per_run and per_category must be >= 0"),
        (cfg.validation.on_anomaly in ("fail", "warn"), "validation.on_anomaly: must be one of ['fail', 'warn']"),
        (1 <= cfg.dump.page_size <= MAX_PAGE_SIZE, f"dump.page_size: must be in [1, {MAX_PAGE_SIZE}] (index.max_result_window)"),
        (cfg.dump.slices >= 1, "dump.slices: must be >= 1"),
        (set(cfg.publish.skip_unchanged) <= set(UPDATE_KINDS), f"publish.skip_unchanged: kinds must be among {list(UPDATE_KINDS)}"),
    ]
    checks += [(False, message) for inp in cfg.inputs for message in inp.problems()]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def parse_config(raw: Any) -> FeatureConfig:
    """Builds and validates a :class:`FeatureConfig` from already-parsed YAML."""
    if not isinstance(raw, Mapping):
        raise ConfigError("config: expected a mapping at the top level")
    allowed = {f.name for f in dataclasses.fields(FeatureConfig)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"config: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    if not raw.get("inputs"):
        raise ConfigError("config.inputs: at least one input is required")
    sections = {
        "labels": Labels,
        "split": Split,
        "model": Model,
        "embedding": Embedding,
        "fewshot": Fewshot,
        "review": Review,
        "neighbours": Neighbours,
        "dump": Dump,
        "publish": Publish,
        "validation": Validation,
    }
    if "labels" not in raw:
        raise ConfigError("config: missing required key 'labels'")
    cfg = FeatureConfig(
        version=_coerce(raw.get("version", 1), int, "config.version"),
        inputs=tuple(_build_input(r, f"inputs[{i}]") for i, r in enumerate(raw["inputs"])),
        **{name: _build(cls, raw[name], name) for name, cls in sections.items() if name in raw},
    )
    _validate(cfg)
    return cfg


def load_config(path: Union[str, Path]) -> FeatureConfig:
    """Reads and validates the YAML file at ``path``."""
    with open(path, encoding="utf-8") as f:
        return parse_config(yaml.safe_load(f))
