import ast
import copy
import dataclasses
import functools
import typing

import pytest
import yaml

from core.config import ConfigError, FeatureConfig, ImageInput, Input, TextInput, load_config, parse_config

from conftest import REPO

pytestmark = pytest.mark.unit

INPUT_CLASSES = {record.kind: record for record in typing.get_args(Input)}


@pytest.fixture
def raw():
    with open(REPO / "feature_config.yaml") as f:
        return yaml.safe_load(f)


def test_repo_config_loads_into_frozen_typed_records():
    cfg = load_config(REPO / "feature_config.yaml")
    assert isinstance(cfg, FeatureConfig)
    assert [i.name for i in cfg.inputs] == ["title", "title_chars", "brand", "gender", "image"]
    assert isinstance(cfg.inputs[0], TextInput) and isinstance(cfg.image, ImageInput)
    assert (cfg.inputs[0].tokens, cfg.inputs[0].ngram_range) == ("words", (1, 2))
    assert (cfg.inputs[1].tokens, cfg.inputs[1].ngram_range) == ("char_ngrams", (3, 4))
    assert cfg.model.hidden_units == (256, 128)
    assert cfg.image.runtime == "onnxruntime"
    with pytest.raises(AttributeError):
        cfg.model.type = "linear"


def test_unknown_key_names_the_allowed_ones(raw):
    raw["inputs"][0]["vocab_sise"] = 10
    with pytest.raises(ConfigError, match=r"inputs\[0\]: unknown key\(s\) \['vocab_sise'\]; allowed: .*'vocab_size'"):
        parse_config(raw)


def test_unknown_top_level_section_rejected(raw):
    raw["trainer"] = {}
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trainer'\]; allowed: \['dump', 'embedding', 'fewshot', 'inputs', 'labels'"):
        parse_config(raw)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(version=2), r"version: must be one of \[1\]"),
        (lambda r: r["dump"].update(page_size=20000), r"dump.page_size: must be in \[1, 10000\]"),
        (lambda r: r["dump"].update(slices=0), "dump.slices: must be >= 1"),
        (lambda r: r["model"].update(type="xgboost"), "model.type: must be one of"),
        (lambda r: r["inputs"][0].update(kind="audio"), r"inputs\[0\].kind: must be one of"),
        (lambda r: r["inputs"][0].update(vocab_size="many"), r"inputs\[0\].vocab_size: expected a number"),
        (lambda r: r["labels"]["attributes"][0].update(source="gender"), "both input and label"),
        (lambda r: r["labels"]["attributes"][0].update(name="title"), "names used twice"),
        (lambda r: next(i for i in r["inputs"] if i["kind"] == "image").update(encoder="vgg"), "encoder: must be one of"),
        (
            lambda r: next(i for i in r["inputs"] if i["kind"] == "image").update(runtime="bfloat16"),
            r"inputs.image.runtime: must be one of \['onnxruntime', 'torch'\]",
        ),
        (lambda r: r["inputs"][0].update(tokens="sentencepiece"), "tokens: must be one of"),
        (lambda r: r["inputs"][0].update(ngram_range=[3, 2]), "ngram_range: must be"),
        (lambda r: r["inputs"][0].update(ngram_range=[1]), "ngram_range: must be"),
        (lambda r: r["model"].update(threshold_labels="test"), "model.threshold_labels: must be one of"),
        (lambda r: r["model"].update(self_training_rounds=-1), "model.self_training_rounds"),
        (lambda r: r["model"].update(self_training_threshold=0.9), r"model: unknown key\(s\) \['self_training_threshold'\]"),
        (lambda r: r["publish"].update(skip_unchanged=["reviews"]), r"publish.skip_unchanged: kinds must be among \['predictions', "),
    ],
)
def test_invalid_values_rejected_with_the_key(raw, mutate, message):
    raw = copy.deepcopy(raw)
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_dropping_an_input_needs_no_code_change(raw):
    raw["inputs"] = [i for i in raw["inputs"] if i["name"] != "brand"]
    assert [i.name for i in parse_config(raw).inputs] == ["title", "title_chars", "gender", "image"]


def test_text_dim_is_a_positive_width_or_null(raw):
    raw["model"]["text_dim"] = None
    assert parse_config(raw).model.text_dim is None
    raw["model"]["text_dim"] = 0
    with pytest.raises(ConfigError, match="text_dim"):
        parse_config(raw)


def test_lazy_adam_is_a_model_flag_off_by_default(raw):
    assert parse_config(raw).model.lazy_adam is False
    raw["model"]["lazy_adam"] = True
    assert parse_config(raw).model.lazy_adam is True
    raw["model"]["lazy_adam"] = "yes"
    with pytest.raises(ConfigError, match="lazy_adam"):
        parse_config(raw)


def test_replace_model_validates(raw):
    cfg = parse_config(raw)
    assert cfg.replace_model(type="linear").model.type == "linear"
    with pytest.raises(ConfigError, match="epochs: expected a number"):
        cfg.replace_model(epochs="x")


@functools.cache
def accessed_attribute_names() -> frozenset:
    """Every ``.name`` attribute access in prodcat's code outside the loader."""
    names = set()
    for folder in ("core", "services", "pipelines", "trainer", "entrypoints", "dags"):
        for path in (REPO / folder).rglob("*.py"):
            if path != REPO / "core" / "config.py":
                names |= {n.attr for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Attribute)}
    return frozenset(names)


def key_paths(raw, cls, prefix=""):
    """``(key path, the dataclass field it fills)`` for every key of the parsed YAML."""
    for key, value in raw.items():
        record = INPUT_CLASSES[raw["kind"]] if cls is None else cls
        path = f"{prefix}.{key}" if prefix else key
        yield path, key
        hint = typing.get_type_hints(record)[key]
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint
        if key == "inputs":
            for i, item in enumerate(value):
                yield from key_paths(item, None, f"{path}[{i}]")
        elif dataclasses.is_dataclass(inner) and isinstance(value, list):
            for i, item in enumerate(value):
                yield from key_paths(item, inner, f"{path}[{i}]")
        elif dataclasses.is_dataclass(inner):
            yield from key_paths(value, inner, path)


def test_every_key_of_the_config_file_is_accessed_as_an_attribute_outside_the_loader(raw):
    """A key no code reads is a promise the code does not keep. This checks a necessary condition:
    some module outside core/config.py accesses an attribute of the key's name (a generic name
    such as ``name`` passes on any access of that name)."""
    accessed = accessed_attribute_names()
    unread = [path for path, key in key_paths(raw, FeatureConfig) if key not in accessed]
    assert unread == []


def test_every_config_record_field_is_accessed_as_an_attribute_outside_the_loader():
    """The same for the fields the file leaves at their defaults, in every record type."""
    records = [FeatureConfig, *INPUT_CLASSES.values()]
    seen, unread = set(), []
    while records:
        record = records.pop()
        if record in seen:
            continue
        seen.add(record)
        for field in dataclasses.fields(record):
            hint = typing.get_type_hints(record)[field.name]
            records += [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
            if field.name not in accessed_attribute_names():
                unread.append(f"{record.__name__}.{field.name}")
    assert unread == []


def test_image_runtime_torch_is_the_float32_reference_and_defaults_to_onnxruntime(raw):
    image = next(i for i in raw["inputs"] if i["kind"] == "image")
    image["runtime"] = "torch"
    assert parse_config(raw).image.runtime == "torch"
    del image["runtime"]
    assert parse_config(raw).image.runtime == "onnxruntime"
