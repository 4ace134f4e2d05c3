"""Validation DoFn and the composite transforms with TestPipeline, and whole preprocessing runs on bad input and reruns."""

import dataclasses
import glob
import gzip
import http.server
import json
import threading
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from core import storage
from core.config import LOCAL_BEAM_RUNNER, load_config, parse_config
from core.taxonomy import CategoryTree
from pipelines import images
from pipelines.preprocess import (
    DEAD,
    ToRows,
    TrainingLabels,
    TransformSplits,
    ValidateProduct,
    WriteCleanParquet,
    WriteDeadLetters,
    analysis_adapter,
    preprocess,
    raw_record_batch,
    split_of,
    to_raw_example,
)

from conftest import REPO

pytestmark = pytest.mark.unit

TREE = CategoryTree.from_paths([("Apparel", "Topwear", "Tshirts"), ("Apparel", "Topwear", "Shirts"), ("Footwear", "Shoes", "Heels")])


@pytest.fixture(scope="module")
def cfg():
    base = load_config(REPO / "feature_config.yaml")
    image = dataclasses.replace(base.image, fetch_timeout_s=1.0, fetch_retries=0)
    return dataclasses.replace(base, inputs=tuple(image if i.kind == "image" else i for i in base.inputs))


def doc(pid, title="Puma Men Blue Tshirt", **extra):
    return {
        "id": pid,
        "title": title,
        "gender": "Men",
        "base_colour": "Blue",
        "season": "Summer",
        "usage": "Casual",
        "image_url": None,
        "true_category": "Apparel > Topwear > Tshirts",
        "rule_categories": [],
        **extra,
    }


BAD_LINES = [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe\x00bad bytes", "invalid_utf8"),
    (json.dumps(doc("1", title="")).encode(), "missing_title"),
    (json.dumps(doc("2", title=None)).encode(), "missing_title"),
    (json.dumps(doc("3", title=12345)).encode(), "wrong_type_title"),
    (json.dumps(doc("4", gender=7)).encode(), "wrong_type_gender"),
    (json.dumps({"title": "no id"}).encode(), "missing_id"),
    (b"[1, 2]", "not_an_object"),
]


def test_validate_product_routes_each_bad_record_with_its_reason(cfg):
    good = json.dumps(doc("10", rule_categories=["Apparel > Topwear > Tshirts", "Not > A > Category"])).encode()
    huge = json.dumps(doc("11", title="x" * 1_000_000)).encode()
    with test_pipeline.TestPipeline(runner=LOCAL_BEAM_RUNNER) as p:
        out = (
            p
            | beam.Create([good, huge] + [line for line, _ in BAD_LINES])
            | beam.ParDo(ValidateProduct(cfg, TREE.to_records())).with_outputs(DEAD, main="valid")
        )
        assert_that(out[DEAD] | "Reasons" >> beam.Map(lambda d: d["reason"]), equal_to([r for _, r in BAD_LINES]), label="dead")
        assert_that(
            out.valid | "Summaries" >> beam.Map(lambda r: (r["id"], len(r["title"]), tuple(r["rule_categories"]))),
            equal_to([("10", 20, ("Apparel", "Apparel > Topwear", "Apparel > Topwear > Tshirts")), ("11", 2000, ())]),
            label="valid",
        )
    counters = {r.key.metric.name: r.committed for r in p.result.metrics().query()["counters"]}
    assert counters["dropped_rule_label_not_in_tree"] == 1
    assert counters["degraded_text_truncated"] == 1
    assert counters["rejected_invalid_json"] == 1


def test_validate_product_keeps_known_human_and_rule_categories_and_counts_unknown_ones(cfg):
    shirts, tshirts = "Apparel > Topwear > Shirts", "Apparel > Topwear > Tshirts"
    line = json.dumps(doc("20", rule_categories=[tshirts], human_categories=[shirts, "Not > A > Category"])).encode()
    rules_only = json.dumps(doc("21", rule_categories=[tshirts])).encode()
    with test_pipeline.TestPipeline(runner=LOCAL_BEAM_RUNNER) as p:
        out = p | beam.Create([line, rules_only]) | beam.ParDo(ValidateProduct(cfg, TREE.to_records())).with_outputs(DEAD, main="valid")
        assert_that(
            out.valid | beam.Map(lambda r: (r["id"], tuple(r["human_categories"]), tuple(r["rule_categories"]))),
            equal_to(
                [
                    ("20", ("Apparel", "Apparel > Topwear", shirts), ("Apparel", "Apparel > Topwear", tshirts)),
                    ("21", (), ("Apparel", "Apparel > Topwear", tshirts)),
                ]
            ),
        )
    counters = {r.key.metric.name: r.committed for r in p.result.metrics().query()["counters"]}
    assert counters["dropped_human_label_not_in_tree"] == 1


def test_labels_add_ancestors_and_mask_unknown_specificity():
    rows = [["Apparel > Topwear"], ["Footwear > Shoes > Heels"], ["Footwear"], [], ["Apparel > Topwear > Shirts", "Footwear > Shoes"]]
    labels, mask = TrainingLabels(TREE)(rows)
    assert labels.shape == mask.shape == (len(rows), len(TREE)) and labels.dtype == mask.dtype == np.float32

    def names(row, matrix, value):
        return {TREE.ids[i] for i, v in enumerate(matrix[row]) if v == value}

    assert [names(r, labels, 1) for r in range(len(rows))] == [
        {"Apparel", "Apparel > Topwear"},
        {"Footwear", "Footwear > Shoes", "Footwear > Shoes > Heels"},
        {"Footwear"},
        set(),
        {"Apparel", "Apparel > Topwear", "Apparel > Topwear > Shirts", "Footwear", "Footwear > Shoes"},
    ]
    assert [names(r, mask, 0) for r in range(len(rows))] == [
        {"Apparel > Topwear > Tshirts", "Apparel > Topwear > Shirts"},
        set(),
        {"Footwear > Shoes", "Footwear > Shoes > Heels"},
        set(),
        {"Footwear > Shoes > Heels"},
    ]
    with pytest.raises(KeyError):
        TrainingLabels(TREE)([["Not > A > Category"]])


def test_split_is_deterministic_and_roughly_90_10():
    splits = [split_of(str(i), "s", 10, 10) for i in range(20000)]
    assert splits == [split_of(str(i), "s", 10, 10) for i in range(20000)]
    assert abs(splits.count("test") / 20000 - 0.10) < 0.01
    assert abs(splits.count("eval") / 20000 - 0.09) < 0.01


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(3)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hanging_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.jpg"
    server.shutdown()


def write_dump(path, lines, tree):
    with storage.atomic_stage(str(path)) as tmp:
        with gzip.open(f"{tmp}/products-00000-of-00001.jsonl.gz", "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
        storage.write_json(f"{tmp}/categories.json", tree.to_records())


def read_transformed(folder):
    files = sorted(glob.glob(f"{folder}/transformed/*.tfrecord.gz"))
    return {bytes(r.numpy()) for r in tf.data.TFRecordDataset(files, compression_type="GZIP")}


def test_preprocess_bad_input_then_rerun_is_identical_with_cache_hits(cfg, tmp_path, image_server, hanging_url, fashion_slice, monkeypatch):
    tree = CategoryTree.load_json(str(REPO / "data" / "fashion_categories.json"))
    image_ids = sorted(p.stem for p in (fashion_slice / "images").glob("*.jpg"))[:6]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = [
        doc(pid, title=f"Brand{i} Men Blue Tshirt", image_url=f"{image_server}/{pid}.jpg", rule_categories=["Apparel > Topwear > Tshirts"])
        for i, pid in enumerate(image_ids)
    ]
    degraded = [
        doc("d404", image_url=f"{image_server}/missing.jpg"),
        doc("dbroken", image_url=f"file://{broken}"),
        doc("dhang", image_url=hanging_url),
        doc("dnone"),
    ]
    lines = [json.dumps(d).encode() for d in good + degraded] + [line for line, _ in BAD_LINES]
    write_dump(tmp_path / "dump", lines, tree)
    cache = str(tmp_path / "cache")

    first = preprocess(cfg, str(tmp_path / "dump"), str(tmp_path / "pre1"), cache, [f"--runner={LOCAL_BEAM_RUNNER}"])
    counters = first["counters"]
    assert counters["image_cache_misses"] == 6 and "image_cache_hits" not in counters
    assert counters["degraded_image_http_404"] == 1
    assert counters["degraded_image_undecodable"] == 1
    assert counters["degraded_image_timeout"] == 1
    assert counters["degraded_image_no_image_url"] == 1
    dead = [json.loads(line) for f in glob.glob(str(tmp_path / "pre1/dead_letters/*.jsonl")) for line in open(f)]
    assert sorted(d["reason"] for d in dead) == sorted(r for _, r in BAD_LINES)
    clean = pq.read_table(glob.glob(str(tmp_path / "pre1/clean/*.parquet"))).to_pylist()
    by_id = {r["id"]: r for r in clean}
    assert set(by_id) == set(image_ids) | {"d404", "dbroken", "dhang", "dnone"}
    assert all(by_id[i]["has_image"] == 1 and len(by_id[i]["image_embedding"]) == 1280 for i in image_ids)
    assert {by_id[i]["image_error"] for i in ("d404", "dbroken", "dhang", "dnone")} == {
        "http_404",
        "undecodable",
        "timeout",
        "no_image_url",
    }

    def clean_ids(run: str, part: str) -> set:
        return {r["id"] for r in pq.read_table(glob.glob(str(tmp_path / run / f"clean/clean-{part}-*.parquet"))).to_pylist()}

    assert clean_ids("pre1", "embedded") == set(image_ids)
    assert clean_ids("pre1", "ready") == {"d404", "dbroken", "dhang", "dnone"}

    def no_encoder(image):
        raise AssertionError("the encoder was loaded in a run where the cache serves every image")

    monkeypatch.setattr(images, "load_encoder", no_encoder)
    second = preprocess(cfg, str(tmp_path / "dump"), str(tmp_path / "pre2"), cache, [f"--runner={LOCAL_BEAM_RUNNER}"])
    assert clean_ids("pre2", "embedded") == set() and clean_ids("pre2", "ready") == set(by_id)
    assert second["counters"]["image_cache_hits"] == 6 and "image_cache_misses" not in second["counters"]
    assert read_transformed(tmp_path / "pre1") == read_transformed(tmp_path / "pre2")
    # only the records of products with a photo hold the image (the others' is all zeros)
    files = glob.glob(str(tmp_path / "pre1/transformed/*.tfrecord.gz"))
    records = [tf.train.Example.FromString(r.numpy()).features.feature for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    assert sorted((list(r["has_image"].int64_list.value), "image" in r) for r in records) == [([0], False)] * 4 + [([1], True)] * 6
    for name in ("title", "brand", "gender"):
        assert (tmp_path / "pre1/transform_fn/transform_fn/assets" / name).read_bytes() == (
            tmp_path / "pre2/transform_fn/transform_fn/assets" / name
        ).read_bytes()
    clean2 = {r["id"]: r for r in pq.read_table(glob.glob(str(tmp_path / "pre2/clean/*.parquet"))).to_pylist()}
    assert clean2 == by_id


def test_write_dead_letters_writes_each_letter_as_one_sorted_json_line(tmp_path):
    letters = [{"reason": "invalid_json", "record": "{not json"}, {"record": "[1, 2]", "reason": "not_an_object"}]
    with test_pipeline.TestPipeline(runner=LOCAL_BEAM_RUNNER) as p:
        _ = p | beam.Create(letters) | WriteDeadLetters(str(tmp_path / "dead"))
    lines = [line for path in glob.glob(str(tmp_path / "dead-*.jsonl")) for line in open(path).read().splitlines()]
    assert sorted(lines) == ['{"reason": "invalid_json", "record": "{not json"}', '{"reason": "not_an_object", "record": "[1, 2]"}']


def test_write_clean_parquet_keeps_only_the_schema_columns(tmp_path):
    schema = pa.schema([("id", pa.string()), ("has_image", pa.int64()), ("image_embedding", pa.list_(pa.float32()))])
    rows = [
        {"id": "1", "has_image": 1, "image_embedding": [0.5, 1.0], "labels": [1.0], "split": "train"},
        {"id": "2", "has_image": 0, "image_embedding": None, "labels": [0.0], "split": "test"},
    ]
    with test_pipeline.TestPipeline(runner=LOCAL_BEAM_RUNNER) as p:
        _ = p | beam.Create(rows) | WriteCleanParquet(str(tmp_path / "clean"), schema)
    table = pq.read_table(glob.glob(str(tmp_path / "clean-*.parquet")))
    assert table.schema.names == ["id", "has_image", "image_embedding"]
    assert sorted(table.to_pylist(), key=lambda r: r["id"]) == [
        {"id": "1", "has_image": 1, "image_embedding": [0.5, 1.0]},
        {"id": "2", "has_image": 0, "image_embedding": None},
    ]


def test_transform_splits_reads_clean_parquet_analyses_the_train_split_only_and_writes_every_split(tmp_path):
    import tensorflow_transform as tft
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.saved import saved_transform_io

    cfg = parse_config(
        {
            "inputs": [
                {"name": "title", "kind": "text", "source": "title", "vocab_size": 10, "oov_buckets": 1},
                {"name": "gender", "kind": "categorical", "source": "gender", "oov_buckets": 1},
            ],
            "labels": {"levels": 2, "rule_field": "rule_categories", "ground_truth_field": "true_category", "attributes": []},
        }
    )

    tree = CategoryTree.from_paths([("Apparel", "Topwear")])
    rows = [
        {"id": pid, "title": title, "gender": gender, "split": split, "rule_categories": ["Apparel"], "human_categories": []}
        for pid, title, gender, split in [
            ("1", "Red Tee", "Men", "train"),
            ("2", "red top", "Women", "train"),
            ("3", "blue tee", "Girls", "eval"),
            ("4", "green hat", "Men", "test"),
        ]
    ]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "clean-00000.parquet"))
    with test_pipeline.TestPipeline(runner=LOCAL_BEAM_RUNNER) as p, tft_beam.Context(temp_dir=str(tmp_path / "tft_tmp")):
        _ = p | TransformSplits(cfg, tree.to_records(), str(tmp_path / "clean-*.parquet"), str(tmp_path))
    output = tft.TFTransformOutput(str(tmp_path / "transform_fn"))
    assert saved_transform_io.exported_as_v1(output.transform_savedmodel_dir)  # TF 1 graph mode (TFT_COMPAT_V1)
    # train only: red (2), then top and tee (1 each, ties by token descending); eval's "blue" and test's words are absent
    assert output.vocabulary_by_name("title") == [b"red", b"top", b"tee"]
    assert output.vocabulary_by_name("gender") == [b"women", b"men"]
    spec = output.transformed_feature_spec()

    def transformed(split):
        files = glob.glob(str(tmp_path / "transformed" / f"{split}-*.tfrecord.gz"))
        examples = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
        return sorted((list(e["title_ids"].values.numpy()), int(e["gender_ids"])) for e in examples)

    # OOV (id 3 for the title, 2 for the gender) where a value was not in the train split
    assert transformed("train") == [([0, 1], 0), ([0, 2], 1)]
    assert transformed("eval") == [([2, 3], 2)]
    assert transformed("test") == [([3], 1)]
    # the split rides through the one transform as a passthrough column, and stays out of the records
    files = glob.glob(str(tmp_path / "transformed" / "*.tfrecord.gz"))
    records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    assert len(records) == 4 and all(set(r.features.feature) == set(spec) for r in records)


def test_encode_transformed_leaves_an_all_zero_image_out_of_its_record():
    from pipelines.preprocess import encode_transformed

    image = pa.array([[0.0, 0.0], [0.5, 0.0], [0.0, 0.0]], pa.large_list(pa.float32()))
    x = pa.array([[1], [2], [3]], pa.large_list(pa.int64()))
    batch = pa.RecordBatch.from_arrays([image, x], ["image", "x"]).slice(1)  # a slice: offsets not from 0
    records = [tf.train.Example.FromString(e).features.feature for e in encode_transformed(batch, ["image"])]
    assert [sorted(r) for r in records] == [["image", "x"], ["x"]]
    assert list(records[0]["image"].float_list.value) == [0.5, 0.0] and records[1]["x"].int64_list.value == [3]
    kept = [tf.train.Example.FromString(e).features.feature for e in encode_transformed(batch, [])]
    assert [list(r["image"].float_list.value) for r in kept] == [[0.5, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("list_type", [pa.large_list(pa.float32()), pa.list_(pa.float32()), pa.list_(pa.float32(), 2)])
def test_without_zero_vectors_nulls_the_rows_with_no_non_zero_value_whatever_the_list_type(list_type):
    from pipelines.preprocess import without_zero_vectors

    image = pa.array([[1.0, 1.0], [0.0, 0.0], [0.0, 3.0], [0.0, 0.0]], list_type)
    batch = pa.RecordBatch.from_arrays([image, pa.array([1, 2, 3, 4])], ["image", "x"]).slice(1)
    out = without_zero_vectors(batch, ["image", "absent"])
    assert out.column(0).type == list_type and out.column(0).to_pylist() == [None, [0.0, 3.0], None]
    assert out.column(1).to_pylist() == [2, 3, 4]
    assert without_zero_vectors(batch.slice(0, 0), ["image"]).num_rows == 0


def test_raw_record_batch_holds_what_a_tf_example_of_each_row_holds(cfg):
    import tensorflow_transform as tft
    from tensorflow_transform.tf_metadata import schema_utils
    from tfx_bsl.coders import example_coder
    from tfx_bsl.public import tfxio

    from core import features

    spec = features.raw_feature_spec(cfg, len(TREE))
    schema = schema_utils.schema_from_feature_spec(spec)
    source = tfxio.TFExampleBeamRecord(physical_format="inmem", telemetry_descriptors=["test"], schema=schema)
    rng = np.random.default_rng(0)
    rows = [
        {**doc("1", title="Puma Men Blue Tshirt", usage=""), "image_embedding": rng.random(1280).tolist(), "has_image": 1},
        {**doc("2", title="Café Women Heels", gender=""), "image_embedding": None, "has_image": 0},
    ]
    rows[0].update(rule_categories=["Footwear > Shoes > Heels"], human_categories=["Apparel > Topwear"])
    rows[1].update(rule_categories=["Footwear"], human_categories=[])
    batch = raw_record_batch(rows, cfg, source.ArrowSchema(), TrainingLabels(TREE))
    from_batch = tf.io.parse_example(example_coder.RecordBatchToExamples(batch), spec)
    coder = tft.coders.ExampleProtoCoder(schema)
    labels, mask = TrainingLabels(TREE)([["Apparel > Topwear"], ["Footwear"]])  # human categories beat rule ones
    examples = [{**to_raw_example(r, cfg), features.LABELS: labels[i], features.LABEL_MASK: mask[i]} for i, r in enumerate(rows)]
    from_examples = tf.io.parse_example([coder.encode(e) for e in examples], spec)
    assert batch.num_rows == 2 and set(from_batch) == set(spec)
    for name in spec:
        a, b = from_batch[name], from_examples[name]
        if isinstance(a, tf.SparseTensor):
            a, b = tf.sparse.to_dense(a), tf.sparse.to_dense(b)
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_the_analysis_is_fed_only_the_columns_its_analyzers_read_and_tfxio_reads_the_rest_as_zeros(cfg):
    import tensorflow_transform as tft
    from tensorflow_transform.tf_metadata import schema_utils
    from tfx_bsl.public import tfxio
    from tfx_bsl.tfxio import tensor_adapter

    from core import features

    schema = schema_utils.schema_from_feature_spec(features.raw_feature_spec(cfg, len(TREE)))
    source = tfxio.TFExampleBeamRecord(physical_format="inmem", telemetry_descriptors=["test"], schema=schema)
    adapter = source.TensorAdapterConfig()
    type_specs = tensor_adapter.TensorAdapter(adapter).TypeSpecs()
    analysed = frozenset(tft.get_analyze_input_columns(features.make_preprocessing_fn(cfg), type_specs))
    assert analysed == {"title", "gender", "base_colour", "season", "usage"}  # no image, no labels
    rows = [{**doc("1"), "image_embedding": np.ones(1280).tolist(), "has_image": 1, "rule_categories": ["Footwear"]}]
    full = raw_record_batch(rows, cfg, source.ArrowSchema(), TrainingLabels(TREE))
    part = raw_record_batch(rows, cfg, source.ArrowSchema(), TrainingLabels(TREE), analysed)
    for name in source.ArrowSchema().names:
        if name in analysed:
            assert part.column(name).equals(full.column(name)), name
        else:
            assert part.column(name).null_count == 1, name
    tensors = tensor_adapter.TensorAdapter(analysis_adapter(adapter, analysed)).ToBatchTensors(part)
    assert tensor_adapter.TensorAdapter(analysis_adapter(adapter, analysed)).TypeSpecs() == type_specs
    np.testing.assert_array_equal(tensors["image"].numpy(), np.zeros((1, 1280), np.float32))
    np.testing.assert_array_equal(tensors["has_image"].numpy(), [0])
    np.testing.assert_array_equal(tensors[features.LABELS].numpy(), np.zeros((1, len(TREE)), np.float32))
    assert tensors["title"].numpy().tolist() == [b"Puma Men Blue Tshirt"]


def _as_list(embedding):
    return None if embedding is None else embedding.tolist()


def test_parquet_row_groups_become_the_rows_read_from_parquet_gives_with_embeddings_as_float32_arrays(tmp_path):
    schema = pa.schema([("id", pa.string()), ("rule_categories", pa.list_(pa.string())), ("image_embedding", pa.list_(pa.float32()))])
    columns = {"id": ["1", "2", "3"], "rule_categories": [["A"], [], None], "image_embedding": [[0.5, 1.5], None, [2.0, 0.25]]}
    pq.write_table(pa.table(columns, schema), tmp_path / "clean.parquet", row_group_size=2)
    with test_pipeline.TestPipeline(runner=LOCAL_BEAM_RUNNER) as p:
        expected = p | "Read" >> beam.io.ReadFromParquet(str(tmp_path / "clean.parquet"))
        rows = p | "ReadBatched" >> beam.io.ReadFromParquetBatched(str(tmp_path / "clean.parquet")) | beam.ParDo(ToRows())
        embeddings = rows | "Embeddings" >> beam.Map(lambda r: r["image_embedding"])
        as_lists = rows | "AsLists" >> beam.Map(lambda r: {**r, "image_embedding": _as_list(r["image_embedding"])})
        assert_that(as_lists, equal_to([{k: v[i] for k, v in columns.items()} for i in range(3)]), label="Rows")
        assert_that(expected, equal_to([{k: v[i] for k, v in columns.items()} for i in range(3)]), label="ReadFromParquet")
        dtypes = embeddings | "Dtypes" >> beam.Map(lambda e: None if e is None else (type(e).__name__, str(e.dtype)))
        assert_that(dtypes, equal_to([("ndarray", "float32"), None, ("ndarray", "float32")]), label="AreArrays")
