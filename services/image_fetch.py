"""Fetching a product image by URL: http(s) with retries, or a file, gs:// or local path.

Kept apart from :mod:`pipelines.images` (the encoder, which pulls in Beam's inference API) so that
readers such as the run report's gallery import only this.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request

from core import storage

MAX_IMAGE_BYTES = 20 * 1024 * 1024


class ImageFetchError(Exception):
    """The image could not be fetched; ``reason`` is a short machine-readable cause."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def fetch_image(url: str, timeout_s: float, retries: int, backoff_s: float = 0.5) -> bytes:
    """The bytes at ``url`` (http/https, gs://, file:// or a path), retrying transient failures."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("", "file", "gs"):
        path = urllib.parse.urlparse(url).path if scheme == "file" else url
        try:
            with storage.open_read(path) as f:
                return f.read(MAX_IMAGE_BYTES + 1)
        except OSError as e:
            raise ImageFetchError("not_found", str(e)) from e
    if scheme not in ("http", "https"):
        raise ImageFetchError("unsupported_scheme", scheme)
    last: Exception = ImageFetchError("unreachable")
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                data = response.read(MAX_IMAGE_BYTES + 1)
            if len(data) > MAX_IMAGE_BYTES:
                raise ImageFetchError("too_large", f"over {MAX_IMAGE_BYTES} bytes")
            return data
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:
                raise ImageFetchError(f"http_{e.code}", url) from e
            last = ImageFetchError(f"http_{e.code}", url)
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            last = ImageFetchError("timeout" if "timed out" in str(e) else "unreachable", str(e))
        if attempt < retries:
            time.sleep(backoff_s * 2**attempt)
    raise last
