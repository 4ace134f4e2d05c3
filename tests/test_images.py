import dataclasses
import io
import logging

import numpy as np
import pytest
from PIL import Image

from core.config import load_config
from pipelines import images

from conftest import REPO

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def decoded(fashion_slice):
    paths = sorted((fashion_slice / "images").glob("*.jpg"))[:6]
    return [images.decode_image(p.read_bytes()) for p in paths]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_onnxruntime_embeddings_match_torch_float32_so_they_share_the_cache(decoded):
    image = load_config(REPO / "feature_config.yaml").image
    ort = images.load_encoder(dataclasses.replace(image, runtime="onnxruntime"))
    torch = images.load_encoder(dataclasses.replace(image, runtime="torch"))
    fast, reference = ort.embed(decoded), torch.embed(decoded)
    assert fast.shape == reference.shape == (len(decoded), 1280) and fast.dtype == np.float32
    assert cosine(fast, reference).min() >= 0.99999
    # Distinct images give distinct embeddings: the check above is not met by a constant output.
    assert cosine(reference[:1], reference[1:2])[0] < 0.99
    assert images.encoder_id(dataclasses.replace(image, runtime="torch")) == images.encoder_id(image)


def test_decode_keeps_224_images_as_they_are_and_resizes_others():
    def jpeg(size, mode="RGB"):
        buf = io.BytesIO()
        Image.new(mode, size, 128).save(buf, format="JPEG")
        return buf.getvalue()

    assert images.decode_image(jpeg((224, 224))).shape == (224, 224, 3)
    assert images.decode_image(jpeg((60, 80), "L")).shape == (224, 224, 3)


def test_progress_is_logged_at_most_once_per_interval(caplog, monkeypatch):
    clock = iter([2.0, 5.0, 12.0, 13.0])  # when each batch ends
    monkeypatch.setattr(images.time, "monotonic", lambda: next(clock))
    progress = images.EmbeddingProgress(every_s=10.0)
    with caplog.at_level(logging.INFO, logger="pipelines.images"):
        progress.add(8, started=0.0)
        progress.add(8, started=2.0)
        progress.add(8, started=5.0)  # ends at 12: 24 images in 12 s since the first began
        progress.add(8, started=12.0)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["embedded 24 images (2.0 images/s over the last 12 s)"]
