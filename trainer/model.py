"""Multi-label category models over the transformed features, plus attribute heads.

All models end in one sigmoid per category (binary cross-entropy averaged over the
classes whose label is known) and one softmax group per attribute (loss counted only
where the attribute is present). Built with ``tf.keras`` (tf_keras once TFT is imported),
so the model sits next to TFT's ``transform_features_layer()`` in the exported graph.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import tensorflow as tf

from core.config import CategoricalInput, FeatureConfig, ImageInput, TextInput
from core.inputs import HAS_IMAGE, KINDS, ids_key, weights_key

CATEGORIES = "categories"
EMBEDDING = "embedding"  # the k-NN space: learned metric part and fixed raw projections, L2-normalised
METRIC_EMBEDDING = "metric_embedding"  # the learned part alone, L2-normalised
PROXIES = "proxies"  # softmax over the finest-level proxies: the metric-learning output (loss only)


class SparseLinear(tf.keras.layers.Layer):
    """``weights . W`` for a sparse (ids, weights) bag such as TF-IDF, without densifying it."""

    def __init__(self, vocab_size: int, units: int, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(self.vocab_size, self.units), initializer="glorot_uniform", trainable=True)

    def call(self, inputs):
        ids, weights = inputs
        ids = tf.sparse.SparseTensor(ids.indices, tf.clip_by_value(ids.values, 0, self.vocab_size - 1), ids.dense_shape)
        out = tf.nn.safe_embedding_lookup_sparse(self.kernel, ids, weights, combiner="sum")
        return tf.reshape(out, [-1, self.units])

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "units": self.units}


class DenseAdam(tf.keras.optimizers.legacy.Adam):
    """Adam with TF's fused kernel, every gradient made dense first.

    A sparse gradient (TF-IDF and embedding rows) is summed into a dense one, as a dense layer's
    would be; then one fused pass updates each variable. ``tf.keras.optimizers.Adam`` on a sparse
    gradient also decays every row's moments each step but in several separate passes over the
    tables, and squares repeated rows before adding them: 49 ms against 17 ms per step for the
    default model's variables on 2 cores.
    """

    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        dense = [(tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g, v) for g, v in grads_and_vars]
        return super().apply_gradients(dense, *args, **kwargs)


class LazyAdam(tf.keras.optimizers.Adam):
    """Adam whose sparse gradients (TF-IDF and embedding rows) update only the rows in the batch.

    Plain Adam decays the moments of every row of a sparse gradient's variable each step, which
    on the ~50k-row text tables costs more than the forward and backward passes together. As in
    TF Addons' LazyAdam, rows absent from a batch keep their moments and weights.
    """

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        dtype = variable.dtype
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        alpha = tf.cast(self.learning_rate, dtype) * tf.sqrt(1 - tf.pow(beta_2, local_step)) / (1 - tf.pow(beta_1, local_step))
        index = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[index], self._velocities[index]
        rows, position = tf.unique(gradient.indices)
        values = tf.math.unsorted_segment_sum(gradient.values, position, tf.size(rows))
        m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * values
        v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(values)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))


class L2Normalise(tf.keras.layers.Layer):
    """Rows scaled to unit length (zero rows stay zero)."""

    def call(self, inputs):
        return tf.math.l2_normalize(inputs, axis=-1, epsilon=1e-12)


class ProxySoftmax(tf.keras.layers.Layer):
    """Normalised softmax over one learned proxy per class: ``softmax(scale * cos(x, proxy))``.

    With a unit-length ``x`` this is the proxy-based metric loss of Zhai & Wu (2019, "Classification
    is a strong baseline for deep metric learning"): examples of a class are pulled to its proxy
    and pushed from the others, so cosine between embeddings measures category similarity.
    """

    def __init__(self, classes: int, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        self.scale = scale

    def build(self, input_shape):
        self.proxies = self.add_weight(name="proxies", shape=(input_shape[-1], self.classes), initializer="glorot_uniform", trainable=True)

    def call(self, inputs):
        return tf.nn.softmax(self.scale * tf.matmul(inputs, tf.math.l2_normalize(self.proxies, axis=0)), axis=-1)

    def get_config(self):
        return {**super().get_config(), "classes": self.classes, "scale": self.scale}


def proxy_crossentropy(leaf_columns: Sequence[int]):
    """The metric loss over the finest-level categories: cross-entropy of :class:`ProxySoftmax`'s
    output against the product's finest-level labels (several share the target evenly), taken from
    the category target ``[labels | mask]``; zero for a product without a finest-level label."""
    columns = tf.constant(list(leaf_columns), dtype=tf.int32)

    def loss(y_true_and_mask: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        labels, _mask = tf.split(y_true_and_mask, 2, axis=-1)
        leaves = tf.gather(labels, columns, axis=-1)
        count = tf.reduce_sum(leaves, axis=-1, keepdims=True)
        target = leaves / tf.maximum(count, 1.0)
        return -tf.reduce_sum(target * tf.math.log(tf.clip_by_value(y_pred, 1e-7, 1.0)), axis=-1)

    return loss


def masked_binary_crossentropy(y_true_and_mask: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """BCE averaged over the known classes. ``y_true_and_mask`` is ``[labels | mask]``."""
    labels, mask = tf.split(y_true_and_mask, 2, axis=-1)
    y_pred = tf.clip_by_value(y_pred, 1e-7, 1 - 1e-7)
    bce = -(labels * tf.math.log(y_pred) + (1 - labels) * tf.math.log(1 - y_pred))
    return tf.reduce_sum(bce * mask, axis=-1) / tf.maximum(tf.reduce_sum(mask, axis=-1), 1.0)


def masked_sparse_crossentropy(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy counted only where the label is present (label >= 0)."""
    y_true = tf.reshape(tf.cast(y_true, tf.int64), [-1])
    present = tf.cast(y_true >= 0, y_pred.dtype)
    ce = tf.keras.losses.sparse_categorical_crossentropy(tf.maximum(y_true, 0), y_pred)
    return ce * present


def model_inputs(cfg: FeatureConfig) -> Dict[str, tf.keras.Input]:
    """The Keras inputs of every transformed feature, as each input's kind defines them."""
    out: Dict[str, tf.keras.Input] = {}
    for inp in cfg.inputs:
        out.update(KINDS[inp.kind].model_inputs(inp))
    return out


def _text_blocks(
    inp: TextInput, inputs: Mapping[str, tf.Tensor], vocab_sizes: Mapping[str, int], text_units: int, linear: bool, width: int
):
    prefix = "wide" if linear else "deep"
    size = inp.vocab_size + inp.oov_buckets
    layer = SparseLinear(size, width if linear else text_units, name=f"{prefix}_{inp.name}_tfidf")
    return [layer([inputs[ids_key(inp.name)], inputs[weights_key(inp.name)]])]


def _categorical_blocks(
    inp: CategoricalInput, inputs: Mapping[str, tf.Tensor], vocab_sizes: Mapping[str, int], text_units: int, linear: bool, width: int
):
    prefix = "wide" if linear else "deep"
    size = vocab_sizes[inp.name] + inp.oov_buckets
    dim = width if linear else inp.embedding_dim
    return [tf.keras.layers.Embedding(size, dim, name=f"{prefix}_{inp.name}_embedding")(inputs[ids_key(inp.name)])]


def _image_blocks(
    inp: ImageInput, inputs: Mapping[str, tf.Tensor], vocab_sizes: Mapping[str, int], text_units: int, linear: bool, width: int
):
    has_image = tf.keras.layers.Reshape((1,))(tf.cast(inputs[HAS_IMAGE], tf.float32))
    image = inputs[inp.name]
    if not linear:
        image = tf.keras.layers.LayerNormalization(name=f"deep_{inp.name}_norm")(image)
    return [image, has_image]


# Per input kind: its transformed features -> learned blocks (``width`` wide when ``linear``).
BLOCKS = {"text": _text_blocks, "categorical": _categorical_blocks, "image": _image_blocks}


def _feature_blocks(
    cfg: FeatureConfig,
    inputs: Mapping[str, tf.Tensor],
    vocab_sizes: Mapping[str, int],
    text_units: int,
    linear: bool,
    width: int,
    shared: Mapping[str, tf.Tensor],
):
    """One tensor per input: a learned projection (``width`` wide when ``linear``). An input in
    ``shared`` reuses that tensor (projected to ``width`` when ``linear``) instead of its own block."""
    blocks = []
    for inp in cfg.inputs:
        if inp.name not in shared:
            blocks.extend(BLOCKS[inp.kind](inp, inputs, vocab_sizes, text_units, linear, width))
        elif linear:
            blocks.append(tf.keras.layers.Dense(width, use_bias=False, name=f"wide_{inp.name}")(shared[inp.name]))
        else:
            blocks.append(shared[inp.name])
    return blocks


def _text_raw_projection(inp: TextInput, inputs: Mapping[str, tf.Tensor], dim: int) -> tf.Tensor:
    bag = [inputs[ids_key(inp.name)], inputs[weights_key(inp.name)]]
    layer = SparseLinear(inp.vocab_size + inp.oov_buckets, dim, trainable=False, name=f"raw_{inp.name}_projection")
    return L2Normalise(name=f"raw_{inp.name}")(layer(bag))


def _image_raw_projection(inp: ImageInput, inputs: Mapping[str, tf.Tensor], dim: int) -> tf.Tensor:
    layer = tf.keras.layers.Dense(dim, use_bias=False, trainable=False, name=f"raw_{inp.name}_projection")
    return L2Normalise(name=f"raw_{inp.name}")(layer(inputs[inp.name]))


# Per input kind with a raw projection in the k-NN space (categoricals have none).
RAW_PROJECTIONS = {"text": _text_raw_projection, "image": _image_raw_projection}


def raw_projections(cfg: FeatureConfig, inputs: Mapping[str, tf.Tensor], dim: int) -> List[tf.Tensor]:
    """Fixed (never trained) random projections of each text input's TF-IDF bag and of the image
    embedding to ``dim`` values, each L2-normalised: they keep what the labels never name (a word
    such as "flats", the look of a clutch) for the k-NN space. None where ``dim`` is 0."""
    if dim == 0:
        return []
    return [RAW_PROJECTIONS[inp.kind](inp, inputs, dim) for inp in cfg.inputs if inp.kind in RAW_PROJECTIONS]


def build_model(
    cfg: FeatureConfig,
    num_categories: int,
    vocab_sizes: Mapping[str, int],
    attribute_sizes: Mapping[str, int],
    leaf_columns: Sequence[int],
) -> tf.keras.Model:
    """The model named by ``cfg.model.type``: ``linear``, ``ffn`` or ``wide_deep``, with the
    metric embedding (``cfg.embedding``) beside the category and attribute heads.

    ``vocab_sizes``: categorical input name -> vocabulary size (without OOV buckets);
    ``attribute_sizes``: attribute name -> number of classes; ``leaf_columns``: the category
    columns of the finest level, the classes of the metric loss.
    """
    m = cfg.model
    inputs = model_inputs(cfg)
    outputs: Dict[str, tf.Tensor] = {}
    logits = []
    hidden = None
    shared: Dict[str, tf.Tensor] = {}
    if m.type == "wide_deep" and m.text_dim:
        # One table per text input feeds both parts: a gradient row per token and batch costs
        # text_dim values instead of categories + hidden_units[0] (the step's largest cost).
        shared = {
            inp.name: SparseLinear(inp.vocab_size + inp.oov_buckets, m.text_dim, name=f"{inp.name}_tfidf")(
                [inputs[ids_key(inp.name)], inputs[weights_key(inp.name)]]
            )
            for inp in cfg.inputs_of("text")
        }
    if m.type in ("linear", "wide_deep"):
        wide = _feature_blocks(cfg, inputs, vocab_sizes, 0, linear=True, width=num_categories, shared=shared)
        wide = [b if b.shape[-1] == num_categories else tf.keras.layers.Dense(num_categories, use_bias=False)(b) for b in wide]
        logits.append(tf.keras.layers.Add(name="wide_logits")(wide) if len(wide) > 1 else wide[0])
        hidden = tf.keras.layers.Concatenate(name="wide_features")(wide) if m.type == "linear" else None
    if m.type in ("ffn", "wide_deep"):
        deep = tf.keras.layers.Concatenate(name="deep_features")(
            _feature_blocks(cfg, inputs, vocab_sizes, text_units=m.hidden_units[0], linear=False, width=0, shared=shared)
        )
        for i, units in enumerate(m.hidden_units):
            deep = tf.keras.layers.Dense(units, activation="relu", name=f"hidden_{i}")(deep)
            deep = tf.keras.layers.Dropout(m.dropout)(deep)
        logits.append(tf.keras.layers.Dense(num_categories, name="deep_logits")(deep))
        hidden = deep
    total = tf.keras.layers.Add()(logits) if len(logits) > 1 else logits[0]
    outputs[CATEGORIES] = tf.keras.layers.Activation("sigmoid", name=CATEGORIES)(total)
    for attr in cfg.labels.attributes:
        outputs[attr.name] = tf.keras.layers.Dense(attribute_sizes[attr.name], activation="softmax", name=attr.name)(hidden)
    e = cfg.embedding
    metric = L2Normalise(name=METRIC_EMBEDDING)(tf.keras.layers.Dense(e.dim, name="metric_projection")(hidden))
    outputs[METRIC_EMBEDDING] = metric
    outputs[PROXIES] = ProxySoftmax(len(leaf_columns), e.scale, name=PROXIES)(metric)
    raw = raw_projections(cfg, inputs, e.raw_dim)
    outputs[EMBEDDING] = L2Normalise(name=EMBEDDING)(
        tf.keras.layers.Concatenate(name="embedding_parts")([tf.keras.layers.Rescaling(e.metric_weight)(metric), *raw]) if raw else metric
    )
    model = tf.keras.Model(inputs=inputs, outputs=outputs)
    losses = {
        CATEGORIES: masked_binary_crossentropy,
        PROXIES: proxy_crossentropy(leaf_columns),
        **{a.name: masked_sparse_crossentropy for a in cfg.labels.attributes},
    }
    # The category loss is a mean over hundreds of mostly-negative classes: weighted up so that
    # the attribute heads' softmax losses do not dominate the shared layers.
    weights = {CATEGORIES: m.category_loss_weight, PROXIES: e.loss_weight, **{a.name: 1.0 for a in cfg.labels.attributes}}
    optimizer = (LazyAdam if m.lazy_adam else DenseAdam)(learning_rate=m.learning_rate)
    model.compile(optimizer=optimizer, loss=losses, loss_weights=weights)
    return model
