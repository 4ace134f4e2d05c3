import copy

import pytest
import yaml

from pipelines.config import ConfigError, FeatureConfig, ImageInput, TextInput, load_config, parse_config

from conftest import REPO


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
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['trainer'\]; allowed: \['inputs', 'labels'"):
        parse_config(raw)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r["model"].update(type="xgboost"), "model.type: must be one of"),
        (lambda r: r["inputs"][0].update(kind="audio"), r"inputs\[0\].kind: must be one of"),
        (lambda r: r["inputs"][0].update(vocab_size="many"), r"inputs\[0\].vocab_size: expected a number"),
        (lambda r: r["labels"]["attributes"][0].update(source="gender"), "both input and label"),
        (lambda r: r["labels"]["attributes"][0].update(name="title"), "names used twice"),
        (lambda r: next(i for i in r["inputs"] if i["kind"] == "image").update(encoder="vgg"), "encoder: must be one of"),
        (lambda r: next(i for i in r["inputs"] if i["kind"] == "image").update(runtime="bfloat16"), r"inputs.image.runtime: must be one of \['onnxruntime', 'torch'\]"),
        (lambda r: r["inputs"][0].update(tokens="sentencepiece"), "tokens: must be one of"),
        (lambda r: r["inputs"][0].update(ngram_range=[3, 2]), "ngram_range: must be"),
        (lambda r: r["inputs"][0].update(ngram_range=[1]), "ngram_range: must be"),
        (lambda r: r["model"].update(threshold_labels="test"), "model.threshold_labels: must be one of"),
        (lambda r: r["model"].update(self_training_rounds=-1), "model.self_training_rounds"),
        (lambda r: r["model"].update(self_training_threshold=0.9), r"model: unknown key\(s\) \['self_training_threshold'\]"),
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


def test_replace_model_validates(raw):
    cfg = parse_config(raw)
    assert cfg.replace_model(type="linear").model.type == "linear"
    with pytest.raises(ConfigError, match="epochs: expected a number"):
        cfg.replace_model(epochs="x")


def test_image_runtime_torch_is_the_float32_reference_and_defaults_to_onnxruntime(raw):
    image = next(i for i in raw["inputs"] if i["kind"] == "image")
    image["runtime"] = "torch"
    assert parse_config(raw).image.runtime == "torch"
    del image["runtime"]
    assert parse_config(raw).image.runtime == "onnxruntime"
