"""Beam + TF Transform preprocessing of one dump, driven by ``feature_config.yaml``.

    clean pipeline:     dump/*.jsonl.gz -> ValidateProducts -(dead letters)-> WriteDeadLetters
                            -> EmbedImages (fetch, cache, RunInference) -> clean rows, ready / embedded
                            -> WriteCleanParquet[ready|embedded] (clean raw data + embeddings, for analysis
                               and neighbours: clean/clean-{ready,embedded}-*.parquet)
    transform pipeline: clean/*.parquet -> TransformSplits: + training labels -> TFXIO record batches
                            -> TF Transform (analyse on train) -> transformed/{train,eval,test}-*.tfrecord.gz
                               (an all-zero image left out of its record) + transform_fn/

Two pipelines, so that every stage streams: TF Transform reads the clean rows twice (analysis,
then transform), and a PCollection consumed after the analysis is held whole by a runner that
keeps data between stages in memory (Beam's FnApiRunner, the local one). For the same reason the rows that needed no
encoder and the embedded ones are written by two writers, not merged by a ``Flatten``: the
local runner held the merged rows whole before writing them (memray at 3x the catalogue: a 512 MiB
input buffer and 3 x 303 MB of stage output).

Bad records never stop the run: a rejected record goes to ``dead_letters/`` with its
reason, a degraded one (no usable image) is kept and flagged. Beam counters report both.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import AbstractSet, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.coders import BytesCoder
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from core import features, inputs, storage
from core.config import LOCAL_BEAM_RUNNER, FeatureConfig
from core.rows import HUMAN_CATEGORIES, RULE_CATEGORIES
from core.taxonomy import CategoryTree
from pipelines import images
from pipelines.counters import beam_counters
from services import image_fetch

log = logging.getLogger(__name__)

NAMESPACE = "prodcat.preprocess"
SPLITS = ("train", "eval", "test")
# The column that carries each row's split through TF Transform (a passthrough key, hidden from the
# preprocessing_fn), so that one transform serves every split.
SPLIT_COLUMN = "prodcat_split"
SPLIT_FIELD = pa.field(SPLIT_COLUMN, pa.large_list(pa.large_binary()))
# TF Transform in TF 1 graph mode; the trainer's TransformFeaturesLayer loads its TF 1 transform graph.
# In TF 2 mode it traces the preprocessing function as a tf.function for each analysis phase and each
# graph it writes: preprocess took about 7 s longer on the full catalogue (README, Measured), with the
# same vocabularies and byte-identical records.
TFT_COMPAT_V1 = True
DEAD = "dead"
MAX_DEAD_RECORD_CHARS = 10_000


def split_of(product_id: str, salt: str, test_percent: int, eval_percent: int) -> str:
    """Deterministic split by product-id hash: test, then eval within development, else train."""
    bucket = int(hashlib.sha256(f"{salt}:{product_id}".encode()).hexdigest()[:8], 16) % 10000
    if bucket < test_percent * 100:
        return "test"
    dev_bucket = int(hashlib.sha256(f"{salt}:eval:{product_id}".encode()).hexdigest()[:8], 16) % 100
    return "eval" if dev_bucket < eval_percent else "train"


class TrainingLabels:
    """Rows' categories -> their training labels and masks, ``[rows, categories]`` float32.

    Labels: the categories closed under ancestors. Below a labelled category that has no labelled
    child, the rules said nothing about which child applies: those descendants are masked out,
    not counted as negatives.
    """

    def __init__(self, tree: CategoryTree):
        size = len(tree)
        self._index = tree.index
        chains = [[tree.index[a] for a in tree.ancestors(cid)] for cid in tree.ids]
        # [k, category] -> its k-th ancestor (0: its parent), or `size`: a column that is always off.
        # Per batch this costs rows x categories x depth, not categories^2 (4,584 in a retailer's tree).
        self._ancestors = np.full((max([1, *map(len, chains)]), size), size)
        for category, chain in enumerate(chains):
            self._ancestors[: len(chain), category] = chain

    def __call__(self, categories: Sequence[Sequence[str]]) -> Tuple[np.ndarray, np.ndarray]:
        """Each row's category ids (unknown ones raise KeyError) -> (labels, mask)."""
        size = len(self._index)
        rows = np.repeat(np.arange(len(categories)), [len(ids) for ids in categories])
        given = np.asarray([self._index[c] for ids in categories for c in ids], dtype=np.int64)
        labels = np.zeros((len(categories), size + 1), dtype=bool)
        labels[rows, given] = True
        for ancestor in self._ancestors:
            labels[rows, ancestor[given]] = True
        labels[:, size] = False
        positive_rows, positive = np.nonzero(labels)
        has_labelled_child = np.zeros_like(labels)
        has_labelled_child[positive_rows, self._ancestors[0][positive]] = True
        open_below = labels & ~has_labelled_child
        open_below[:, size] = False
        masked = np.zeros((len(categories), size), dtype=bool)
        for ancestor in self._ancestors:
            masked |= open_below[:, ancestor]
        return labels[:, :size].astype(np.float32), (~masked).astype(np.float32)


def _dead(reason: str, record: Any) -> beam.pvalue.TaggedOutput:
    Metrics.counter(NAMESPACE, f"rejected_{reason}").inc()
    text = record if isinstance(record, str) else repr(record)
    return beam.pvalue.TaggedOutput(DEAD, {"reason": reason, "record": text[:MAX_DEAD_RECORD_CHARS]})


class ValidateProduct(beam.DoFn):
    """Parses one dumped JSON line into a clean row, or emits a dead letter with the reason. The row's
    rule and human categories are those in the tree, closed under ancestors."""

    def __init__(self, cfg: FeatureConfig, tree_records: List[dict]):
        self._cfg = cfg
        self._tree_records = tree_records
        self._string_sources = sorted(
            set(inputs.string_columns(cfg)) | {a.source for a in cfg.labels.attributes} | {cfg.labels.ground_truth_field}
        )
        self._max_chars = max((i.max_chars for i in cfg.inputs_of("text")), default=2000)
        self._text_sources = {i.source for i in cfg.inputs_of("text")}
        self._unknown_label = Metrics.counter(NAMESPACE, "dropped_rule_label_not_in_tree")
        self._unknown_human_label = Metrics.counter(NAMESPACE, "dropped_human_label_not_in_tree")
        self._truncated = Metrics.counter(NAMESPACE, "degraded_text_truncated")

    def setup(self) -> None:
        self._tree = CategoryTree.from_records(self._tree_records)

    def _known_categories(self, raw: Any, unknown_counter: Any) -> List[str]:
        """The category ids of a label field that are in the tree; the others are counted and dropped."""
        values = raw if isinstance(raw, list) else ([] if raw is None else [raw])
        known = [c for c in values if isinstance(c, str) and c in self._tree]
        if len(known) != len(values):
            unknown_counter.inc(len(values) - len(known))
        return known

    def process(self, line: bytes) -> Iterator[Any]:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield _dead("invalid_utf8", line.decode("utf-8", errors="replace"))
            return
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            yield _dead("invalid_json", text)
            return
        if not isinstance(doc, dict):
            yield _dead("not_an_object", text)
            return
        pid = doc.get("id")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid).strip() == "":
            yield _dead("missing_id", text)
            return
        row: Dict[str, Any] = {"id": str(pid)}
        for field in self._string_sources:
            value = doc.get(field)
            if value is not None and not isinstance(value, str):
                yield _dead(f"wrong_type_{field}", text)
                return
            row[field] = (value or "").strip()
        for field in self._text_sources:
            if not row[field]:
                yield _dead(f"missing_{field}", text)
                return
            if len(row[field]) > self._max_chars:
                self._truncated.inc()
                row[field] = row[field][: self._max_chars]
        image_url = doc.get(self._cfg.image.source) if self._cfg.image else None
        row["image_url"] = image_url if isinstance(image_url, str) and image_url else ""
        rules = self._known_categories(doc.get(self._cfg.labels.rule_field), self._unknown_label)
        human = self._known_categories(doc.get(self._cfg.labels.human_field), self._unknown_human_label)
        row[RULE_CATEGORIES] = self._tree.closure(rules)
        row[HUMAN_CATEGORIES] = self._tree.closure(human)
        split = self._cfg.split
        row["split"] = split_of(row["id"], split.salt, split.test_percent, split.eval_percent)
        Metrics.counter(NAMESPACE, f"valid_{row['split']}").inc()
        yield row


class FetchImage(beam.DoFn):
    """Fetches and decodes a row's image, or flags the row; looks the embedding up in the cache.

    Outputs: main = (row, decoded image) still to embed; ``ready`` = rows that need no encoder
    (a cache hit, or no usable image, flagged with ``image_error``).
    """

    READY = "ready"

    def __init__(self, cfg: FeatureConfig, cache_root: str):
        self._image = cfg.image
        self._cache_root = cache_root
        self._hits = Metrics.counter(NAMESPACE, "image_cache_hits")
        self._misses = Metrics.counter(NAMESPACE, "image_cache_misses")

    def setup(self) -> None:
        self._cache = images.EmbeddingCache(self._cache_root, images.encoder_id(self._image))

    def process(self, row: Dict[str, Any]) -> Iterator[Any]:
        if not row["image_url"]:
            yield beam.pvalue.TaggedOutput(self.READY, flag_no_image(row, "no_image_url"))
            return
        try:
            data = image_fetch.fetch_image(row["image_url"], self._image.fetch_timeout_s, self._image.fetch_retries)
            digest = images.content_hash(data)
            cached = self._cache.get(digest)
            if cached is not None:
                self._hits.inc()
                yield beam.pvalue.TaggedOutput(self.READY, with_embedding(row, cached, digest))
                return
            decoded = images.decode_image(data)
        except image_fetch.ImageFetchError as e:
            yield beam.pvalue.TaggedOutput(self.READY, flag_no_image(row, e.reason))
            return
        self._misses.inc()
        yield (row, digest), decoded


def flag_no_image(row: Dict[str, Any], reason: str) -> Dict[str, Any]:
    Metrics.counter(NAMESPACE, f"degraded_image_{reason}").inc()
    return {**row, "has_image": 0, "image_error": reason, "image_hash": "", "image_embedding": None}


def with_embedding(row: Dict[str, Any], embedding: np.ndarray, digest: str) -> Dict[str, Any]:
    emb = np.asarray(embedding, dtype=np.float32)
    if not np.all(np.isfinite(emb)):
        return flag_no_image(row, "non_finite_embedding")
    return {**row, "has_image": 1, "image_error": "", "image_hash": digest, "image_embedding": emb.tolist()}


class AttachEmbedding(beam.DoFn):
    """Puts RunInference's embedding on its row and into the cache."""

    def __init__(self, cfg: FeatureConfig, cache_root: str):
        self._image = cfg.image
        self._cache_root = cache_root

    def setup(self) -> None:
        self._cache = images.EmbeddingCache(self._cache_root, images.encoder_id(self._image))

    def process(self, element: Tuple[Tuple[Dict[str, Any], str], PredictionResult]) -> Iterator[Dict[str, Any]]:
        (row, digest), result = element
        embedding = np.asarray(result.inference, dtype=np.float32)
        self._cache.put(digest, embedding)
        yield with_embedding(row, embedding, digest)


class EmbedImages(beam.PTransform):
    """Rows -> ``{"ready": rows that needed no encoder (a cache hit, or flagged), "embedded": rows
    embedded through RunInference}``, each with ``image_embedding`` or flagged."""

    def __init__(self, cfg: FeatureConfig, cache_root: str):
        super().__init__()
        self._cfg = cfg
        self._cache_root = cache_root

    def expand(self, rows: beam.PCollection) -> Dict[str, beam.PCollection]:
        fetched = rows | "FetchImages" >> beam.ParDo(FetchImage(self._cfg, self._cache_root)).with_outputs(
            FetchImage.READY, main="to_embed"
        )
        embedded = (
            fetched.to_embed
            | "RunEncoder" >> RunInference(KeyedModelHandler(images.ImageEncoderModelHandler(self._cfg.image)))
            | "AttachEmbeddings" >> beam.ParDo(AttachEmbedding(self._cfg, self._cache_root))
        )
        return {"ready": fetched[FetchImage.READY], "embedded": embedded}


def clean_parquet_schema(cfg: FeatureConfig, attribute_sources: Sequence[str]) -> pa.Schema:
    string_fields = sorted(
        {"id", "split", "image_url", "image_error", "image_hash", cfg.labels.ground_truth_field}
        | set(inputs.string_columns(cfg))
        | set(attribute_sources)
    )
    return pa.schema(
        [(f, pa.string()) for f in string_fields]
        + [
            (RULE_CATEGORIES, pa.list_(pa.string())),
            (HUMAN_CATEGORIES, pa.list_(pa.string())),
            ("has_image", pa.int64()),
            ("image_embedding", pa.list_(pa.float32())),
        ]
    )


def to_clean_record(row: Dict[str, Any], schema: pa.Schema) -> Dict[str, Any]:
    return {name: row.get(name) for name in schema.names}


def to_raw_example(row: Dict[str, Any], cfg: FeatureConfig) -> Dict[str, Any]:
    """The row's raw inputs (as served) and attribute labels: every feature of the raw feature spec
    except the category labels and mask (:class:`TrainingLabels`)."""
    example = inputs.raw_inputs(cfg, row)
    for attr in cfg.labels.attributes:
        value = row.get(attr.source) or ""
        example[attr.source] = [value] if value else []
    return example


def without_zero_vectors(batch: pa.RecordBatch, names: Sequence[str]) -> pa.RecordBatch:
    """``batch`` with each list column of ``names`` null in the rows that hold no non-zero value."""
    import pyarrow.compute as pc

    for name in names:
        index = batch.schema.get_field_index(name)
        if index < 0:
            continue
        column = batch.column(index)
        rows = pc.list_parent_indices(column).to_numpy()
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        zero = np.bincount(rows[values != 0], minlength=len(column)) == 0
        if zero.any():
            nulled = pc.if_else(pa.array(zero), pa.nulls(len(column), column.type), column)
            batch = batch.set_column(index, batch.schema.field(index), nulled)
    return batch


def encode_transformed(batch: pa.RecordBatch, left_out_when_zero: Sequence[str]) -> List[bytes]:
    """TF Transform's output record batch -> serialized ``tf.Example``s: tfx_bsl's C++ encoder, then
    each re-serialized with its features in name order (the encoder's map order varies between
    runs; a rerun must write the same bytes). A feature of ``left_out_when_zero`` is left out of
    the records where all its values are zero (:func:`core.inputs.left_out_when_zero`)."""
    from tensorflow.core.example.example_pb2 import Example
    from tfx_bsl.coders import example_coder

    out = []
    for encoded in example_coder.RecordBatchToExamples(without_zero_vectors(batch, left_out_when_zero)):
        example = Example.FromString(encoded)
        for name in left_out_when_zero:
            # the encoder writes a null list as a feature without values
            if name in example.features.feature and not example.features.feature[name].WhichOneof("kind"):
                del example.features.feature[name]
        out.append(example.SerializeToString(deterministic=True))
    return out


class EncodeBySplit(beam.DoFn):
    """TF Transform's output (a record batch with :data:`SPLIT_COLUMN`, passthrough data) -> each
    row's serialized ``tf.Example`` (:func:`encode_transformed`, without the split) in the output
    named by its split."""

    def __init__(self, left_out_when_zero: Sequence[str]):
        self._left_out_when_zero = tuple(left_out_when_zero)

    def process(self, transformed: Tuple[pa.RecordBatch, Any]) -> Iterator[beam.pvalue.TaggedOutput]:
        batch, _unary_passthrough = transformed
        index = batch.schema.get_field_index(SPLIT_COLUMN)
        splits = batch.column(index).flatten().to_pylist()
        for split, example in zip(splits, encode_transformed(batch.remove_column(index), self._left_out_when_zero)):
            yield beam.pvalue.TaggedOutput(split.decode(), example)


def raw_record_batch(
    rows: Sequence[Dict[str, Any]],
    cfg: FeatureConfig,
    schema: pa.Schema,
    training_labels: TrainingLabels,
    columns: Optional[AbstractSet[str]] = None,
    with_split: bool = False,
) -> pa.RecordBatch:
    """Clean rows -> one record batch of their raw examples (:func:`to_raw_example`, and the
    training labels of their human categories where they have any, else of their rule
    categories) in ``schema``, the large-list columns TFXIO decodes ``tf.Example``s into; numeric
    values go in by the array, not one Python value at a time. Only ``columns`` (all if None) are
    filled; the others are null in every row. ``with_split`` appends each row's split as
    :data:`SPLIT_FIELD`."""
    examples = [to_raw_example(r, cfg) for r in rows]
    matrices: Dict[str, np.ndarray] = {}
    if columns is None or {features.LABELS, features.LABEL_MASK} & columns:
        categories = [r.get(HUMAN_CATEGORIES) or r.get(RULE_CATEGORIES) or [] for r in rows]
        matrices = dict(zip((features.LABELS, features.LABEL_MASK), training_labels(categories)))
    arrays = []
    for field in schema:
        if columns is not None and field.name not in columns:
            arrays.append(pa.nulls(len(rows), field.type))
            continue
        if field.name in matrices:
            lengths = [matrices[field.name].shape[1]] * len(rows)
            values = pa.array(matrices[field.name].reshape(-1), field.type.value_type)
        elif pa.types.is_large_binary(field.type.value_type):
            per_row = [[v] if isinstance(v, (str, bytes)) else list(v) for v in (e[field.name] for e in examples)]
            lengths = [len(v) for v in per_row]
            values = pa.array([v.encode() if isinstance(v, str) else v for vs in per_row for v in vs], field.type.value_type)
        else:
            numeric = [np.asarray(e[field.name]).reshape(-1) for e in examples]
            lengths = [len(a) for a in numeric]
            values = pa.array(np.concatenate(numeric) if numeric else [], field.type.value_type)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int64())
        arrays.append(pa.LargeListArray.from_arrays(offsets, values))
    if with_split:
        splits = pa.array([r["split"].encode() for r in rows], pa.large_binary())
        arrays.append(pa.LargeListArray.from_arrays(pa.array(np.arange(len(rows) + 1), pa.int64()), splits))
        schema = schema.append(SPLIT_FIELD)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def analysis_adapter(adapter: Any, analysed: AbstractSet[str]) -> Any:
    """TFXIO's ``adapter`` (a TensorAdapterConfig) with every dense feature outside ``analysed`` read
    as zeros where its column is null. The analysis is fed null there: its analyzers never read
    those features, and TF Transform holds the analysed rows between its two phases (the
    vocabularies, then TF-IDF), which would otherwise be mostly 1,280-float image inputs."""
    from tfx_bsl.tfxio import tensor_adapter

    representations = {}
    for name, representation in adapter.tensor_representations.items():
        if name not in analysed and representation.WhichOneof("kind") == "dense_tensor":
            representation = type(representation).FromString(representation.SerializeToString())
            value_type = adapter.arrow_schema.field(name).type.value_type
            default = representation.dense_tensor.default_value
            if pa.types.is_floating(value_type):
                default.float_value = 0.0
            elif pa.types.is_integer(value_type):
                default.int_value = 0
            else:
                default.bytes_value = b""
        representations[name] = representation
    return tensor_adapter.TensorAdapterConfig(adapter.arrow_schema, representations)


class WriteDeadLetters(beam.PTransform):
    """Dead letters (``{"reason", "record"}``) -> JSON lines under ``prefix`` (``<prefix>-*.jsonl``)."""

    def __init__(self, prefix: str):
        super().__init__()
        self._prefix = prefix

    def expand(self, dead: beam.PCollection) -> beam.PCollection:
        return dead | "Encode" >> beam.Map(lambda d: json.dumps(d, sort_keys=True)) | "Write" >> beam.io.WriteToText(self._prefix, ".jsonl")


class WriteCleanParquet(beam.PTransform):
    """Clean rows -> Parquet files ``<prefix>-*.parquet`` holding the columns of ``schema``."""

    def __init__(self, prefix: str, schema: pa.Schema):
        super().__init__()
        self._prefix = prefix
        self._schema = schema

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (
            rows
            | "ToCleanRecords" >> beam.Map(to_clean_record, self._schema)
            | "Write" >> beam.io.WriteToParquet(self._prefix, self._schema, file_name_suffix=".parquet")
        )


class ToRows(beam.DoFn):
    """A Parquet row group (a ``pyarrow.Table``) -> its rows as dicts. A list-of-floats column (the
    image embedding) comes as numpy views of the column, not as Python lists of floats that
    the raw examples turn back into arrays."""

    def process(self, table: pa.Table) -> Iterator[Dict[str, Any]]:
        table = table.combine_chunks()
        columns = {}
        for name, column in zip(table.column_names, table.columns):
            array = column.chunk(0) if column.num_chunks else pa.array([], column.type)
            if pa.types.is_list(array.type) and pa.types.is_floating(array.type.value_type):
                values = array.values.to_numpy(zero_copy_only=False)
                offsets = array.offsets.to_numpy()
                valid = array.is_valid().to_numpy(zero_copy_only=False)
                columns[name] = [values[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(array))]
            else:
                columns[name] = array.to_pylist()
        for i in range(table.num_rows):
            yield {name: values[i] for name, values in columns.items()}


class TransformSplits(beam.PTransform):
    """Clean Parquet files (``clean_pattern``) -> raw examples as record batches -> TF Transform
    analysed on the train split only, then one transform of every split (each row's split passed
    through it) -> ``<out_dir>/transform_fn/`` and ``<out_dir>/transformed/{train,eval,test}-*.tfrecord.gz``.

    The analysis and the transform each read the files: one read feeding both would be held whole
    between them. A record leaves out the features of :func:`core.inputs.left_out_when_zero` where
    they are all zeros; parse the records with :func:`core.inputs.transformed_spec`. Needs an
    enclosing ``tensorflow_transform.beam.Context`` (its temp dir); runs TF Transform in TF 1 graph
    mode (:data:`TFT_COMPAT_V1`).
    """

    def __init__(self, cfg: FeatureConfig, tree_records: List[dict], clean_pattern: str, out_dir: str):
        super().__init__()
        self._cfg = cfg
        self._num_categories = len(tree_records)
        self._labels = TrainingLabels(CategoryTree.from_records(tree_records))
        self._clean_pattern = clean_pattern
        self._out_dir = out_dir

    def _record_batches(
        self,
        rows: beam.PCollection,
        name: str,
        arrow_schema: pa.Schema,
        columns: Optional[AbstractSet[str]] = None,
        with_split: bool = False,
    ) -> beam.PCollection:
        return (
            rows
            | f"BatchRows[{name}]" >> beam.BatchElements(min_batch_size=64, max_batch_size=1000)
            | f"ToRecordBatches[{name}]" >> beam.Map(raw_record_batch, self._cfg, arrow_schema, self._labels, columns, with_split)
        )

    def _clean_rows(self, pbegin: beam.pvalue.PBegin, purpose: str) -> beam.PCollection:
        return (
            pbegin
            | f"ReadCleanFor{purpose}" >> beam.io.ReadFromParquetBatched(self._clean_pattern)
            | f"ToRowsFor{purpose}" >> beam.ParDo(ToRows())
        )

    def expand(self, pbegin: beam.pvalue.PBegin) -> Dict[str, beam.PCollection]:
        """Returns the names of the transformed files written, by split."""
        import tensorflow_transform as tft
        import tensorflow_transform.beam as tft_beam
        from tensorflow_transform.tf_metadata import schema_utils
        from tfx_bsl.public import tfxio
        from tfx_bsl.tfxio import tensor_adapter

        raw_schema = schema_utils.schema_from_feature_spec(features.raw_feature_spec(self._cfg, self._num_categories))
        source = tfxio.TFExampleBeamRecord(physical_format="inmem", telemetry_descriptors=["prodcat"], schema=raw_schema)
        arrow_schema = source.ArrowSchema()
        adapter = source.TensorAdapterConfig()
        preprocessing_fn = features.make_preprocessing_fn(self._cfg)
        analysed = frozenset(
            tft.get_analyze_input_columns(
                preprocessing_fn, tensor_adapter.TensorAdapter(adapter).TypeSpecs(), force_tf_compat_v1=TFT_COMPAT_V1
            )
        )
        train = self._clean_rows(pbegin, "Analysis") | "KeepTrain" >> beam.Filter(lambda r: r["split"] == "train")
        analysis_input = (self._record_batches(train, "analysis", arrow_schema, analysed), analysis_adapter(adapter, analysed))
        # One transform for every split, each row's split passed through it: one per split loaded
        # the transform graph once each and tripled the transform's stages.
        batches = self._record_batches(self._clean_rows(pbegin, "Transform"), "transform", arrow_schema, with_split=True)
        with_split = tensor_adapter.TensorAdapterConfig(arrow_schema.append(SPLIT_FIELD), adapter.tensor_representations)
        with tft_beam.Context(force_tf_compat_v1=TFT_COMPAT_V1):
            transform_fn = analysis_input | "AnalyzeTrain" >> tft_beam.AnalyzeDataset(preprocessing_fn)
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(storage.join(self._out_dir, "transform_fn"))
            with tft_beam.Context(passthrough_keys={SPLIT_COLUMN}):
                # Record batches out, encoded by tfx_bsl's C++ encoder: a dict and a Python proto
                # encode per example cost more than the transform itself.
                data, _ = ((batches, with_split), transform_fn) | "Transform" >> tft_beam.TransformDataset(output_record_batches=True)
        encoded = data | "EncodeTransformed" >> beam.ParDo(EncodeBySplit(inputs.left_out_when_zero(self._cfg))).with_outputs(*SPLITS)
        return {
            name: encoded[name]
            | f"WriteTransformed[{name}]"
            >> beam.io.WriteToTFRecord(storage.join(self._out_dir, "transformed", name), file_name_suffix=".tfrecord.gz")
            for name in SPLITS
        }


def preprocess(
    cfg: FeatureConfig,
    dump_dir: str,
    out_dir: str,
    cache_root: str,
    beam_args: Optional[Sequence[str]] = None,
) -> dict:
    """Runs the clean and transform pipelines over a finished dump; returns the summary it wrote."""
    import tensorflow_transform.beam as tft_beam

    from pipelines.dump import read_tree

    storage.require_complete(dump_dir)
    tree = read_tree(dump_dir)
    parquet_schema = clean_parquet_schema(cfg, [a.source for a in cfg.labels.attributes])
    with storage.atomic_stage(out_dir) as tmp:
        clean_prefix = storage.join(tmp, "clean", "clean")
        options = PipelineOptions(list(beam_args or [f"--runner={LOCAL_BEAM_RUNNER}"]))
        with beam.Pipeline(options=options) as clean:
            lines = clean | "ReadDump" >> beam.io.ReadFromText(storage.join(dump_dir, "products-*.jsonl.gz"), coder=BytesCoder())
            validated = lines | "ValidateProducts" >> beam.ParDo(ValidateProduct(cfg, tree.to_records())).with_outputs(DEAD, main="valid")
            _ = validated[DEAD] | "WriteDeadLetters" >> WriteDeadLetters(storage.join(tmp, "dead_letters", "dead"))
            parts = {"rows": validated.valid} if cfg.image is None else validated.valid | "EmbedImages" >> EmbedImages(cfg, cache_root)
            for name, rows in parts.items():
                _ = rows | f"WriteCleanParquet[{name}]" >> WriteCleanParquet(f"{clean_prefix}-{name}", parquet_schema)
        with beam.Pipeline(options=options) as transform, tft_beam.Context(temp_dir=storage.join(tmp, "tft_tmp")):
            _ = transform | "TransformSplits" >> TransformSplits(cfg, tree.to_records(), f"{clean_prefix}-*.parquet", tmp)
        counters = beam_counters(clean.result, NAMESPACE)
        FileSystems.delete([storage.join(tmp, "tft_tmp")])
        storage.write_json(storage.join(tmp, "categories.json"), tree.to_records())
        summary = {"counters": counters, "categories": len(tree)}
        storage.write_json(storage.join(tmp, "summary.json"), summary)
    log.info("preprocessed %s -> %s: %s", dump_dir, out_dir, summary)
    return summary
