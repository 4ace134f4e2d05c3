"""Input kinds: one row -> raw inputs mapping for training and serving, and one definition per kind."""

import ast

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
from tensorflow_transform.tf_metadata import schema_utils

from core import features, inputs
from core.config import INPUT_RECORDS, load_config
from pipelines.preprocess import to_raw_example
from trainer.serving import raw_batch, serving_input_specs

from conftest import REPO

pytestmark = pytest.mark.unit

NUM_CATEGORIES = 3


def clean_row(pid, embedding, has_image):
    return {
        "id": pid,
        "title": f"Puma Men Blue Tshirt {pid}",
        "gender": "Men",
        "base_colour": "Blue",
        "season": "",
        "usage": "Casual",
        "has_image": has_image,
        "image_embedding": embedding,
    }


def test_a_row_gives_identical_raw_inputs_in_the_training_example_and_the_serving_batch():
    cfg = load_config(REPO / "feature_config.yaml")
    rows = [clean_row("1", np.linspace(-1, 1, cfg.image.dim).tolist(), 1), clean_row("2", None, 0)]
    spec = {k: v for k, v in features.raw_feature_spec(cfg, NUM_CATEGORIES).items() if k not in (features.LABELS, features.LABEL_MASK)}
    coder = tft.coders.ExampleProtoCoder(schema_utils.schema_from_feature_spec(spec))
    serving_spec = features.raw_feature_spec(cfg, NUM_CATEGORIES, with_labels=False)
    trained_on = tf.io.parse_example([coder.encode(to_raw_example(row, cfg)) for row in rows], serving_spec)
    served = raw_batch(cfg, rows)
    assert sorted(served) == sorted(trained_on) == sorted(serving_input_specs(cfg)) == ["gender", "has_image", "image", "title"]
    for name, tensor in trained_on.items():
        served_tensor = tf.constant(served[name])
        assert served_tensor.dtype == tensor.dtype == serving_input_specs(cfg)[name].dtype
        np.testing.assert_array_equal(served_tensor.numpy(), tensor.numpy(), err_msg=name)
    assert served["image"][1].tolist() == [0.0] * cfg.image.dim and served["has_image"].tolist() == [1, 0]


def test_an_empty_batch_keeps_each_raw_input_shape():
    cfg = load_config(REPO / "feature_config.yaml")
    assert {name: value.shape for name, value in raw_batch(cfg, []).items()} == {
        "title": (0,),
        "gender": (0,),
        "image": (0, cfg.image.dim),
        "has_image": (0,),
    }


def test_every_configurable_input_kind_has_a_definition():
    assert set(inputs.KINDS) == set(INPUT_RECORDS)


def isinstance_checks_on_input_records(path):
    """Line numbers of ``isinstance(x, <input record class or a tuple with one>)`` in ``path``."""
    records = {record.__name__ for record in INPUT_RECORDS.values()}
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            if any(getattr(c, "id", None) in records for c in classes):
                lines.append(node.lineno)
    return lines


def test_isinstance_checks_on_input_records_are_found(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f(i):\n    return isinstance(i, (TextInput, str)) or isinstance(i, dict)\n")
    assert isinstance_checks_on_input_records(module) == [2]


def test_no_code_dispatches_on_input_kind_with_isinstance():
    found = {
        str(path.relative_to(REPO)): isinstance_checks_on_input_records(path)
        for folder in ("core", "services", "pipelines", "trainer", "entrypoints", "dags")
        for path in sorted((REPO / folder).rglob("*.py"))
    }
    assert {path: lines for path, lines in found.items() if lines} == {}
