"""Run-scoped folders on a local disk or ``gs://``, written atomically.

A stage writes everything into a temporary sibling folder; only when it finished are
the files moved to the stage folder and a ``_SUCCESS`` marker written last. Readers
check the marker, so a crashed or rerun task never leaves a half-written stage behind.
Beam's ``FileSystems`` gives one API over local paths and GCS (and S3/HDFS where installed).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import uuid
from typing import IO, Any, Iterator

import orjson
from apache_beam.io.filesystems import FileSystems

SUCCESS = "_SUCCESS"


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def safe_run_id(run_id: str) -> str:
    """An Airflow run id (``manual__2026-11-22T10:00:00+00:00``) as a folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id).strip("_")


def run_dir(data_root: str, dag_id: str, run_id: str) -> str:
    """``<data_root>/runs/<dag_id>/<run_id>``: each DAG run's own folder."""
    return join(data_root, "runs", dag_id, safe_run_id(run_id))


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def is_complete(stage_dir: str) -> bool:
    return exists(join(stage_dir, SUCCESS))


def require_complete(stage_dir: str) -> str:
    if not is_complete(stage_dir):
        raise FileNotFoundError(f"{stage_dir} has no {SUCCESS} marker: its stage did not finish")
    return stage_dir


def open_write(path: str) -> IO[bytes]:
    if not is_remote(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return FileSystems.create(path, compression_type="uncompressed")


def open_read(path: str) -> IO[bytes]:
    return FileSystems.open(path, compression_type="uncompressed")


def list_files(directory: str, pattern: str = "*") -> list[str]:
    result = FileSystems.match([join(directory, pattern)])[0]
    return sorted(m.path for m in result.metadata_list)


def copy_local_tree(local_dir: str, directory: str) -> None:
    """Copies every file under the local folder ``local_dir`` to the same relative path under
    ``directory`` (local or remote)."""
    for root, _, names in os.walk(local_dir):
        for name in names:
            source = os.path.join(root, name)
            relative = os.path.relpath(source, local_dir).split(os.sep)
            with open(source, "rb") as src, open_write(join(directory, *relative)) as dst:
                shutil.copyfileobj(src, dst)


def write_json(path: str, value: Any) -> None:
    """Writes ``value`` as JSON to ``path`` through a temporary file and a rename."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open_write(tmp) as f:
        f.write(json.dumps(value, indent=1, sort_keys=True, default=str).encode("utf-8"))
    if exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def read_json(path: str) -> Any:
    with open_read(path) as f:
        return json.loads(f.read().decode("utf-8"))


def _delete_tree(path: str) -> None:
    if not exists(path):
        return
    if is_remote(path):
        FileSystems.delete([path.rstrip("/") + "/"])
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_stage(stage_dir: str) -> Iterator[str]:
    """Yields a temporary folder; on success it replaces ``stage_dir`` and marks it complete."""
    stage_dir = stage_dir.rstrip("/")
    tmp = f"{stage_dir}.tmp-{uuid.uuid4().hex[:12]}"
    if not is_remote(tmp):
        os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        _delete_tree(tmp)
        raise
    if is_remote(stage_dir):
        _delete_tree(stage_dir)
        sources = [m.path for m in FileSystems.match([tmp + "/**"])[0].metadata_list]
        FileSystems.rename(sources, [stage_dir + s[len(tmp) :] for s in sources])
    else:
        old = f"{stage_dir}.old-{uuid.uuid4().hex[:12]}"
        if os.path.exists(stage_dir):
            os.rename(stage_dir, old)
        os.rename(tmp, stage_dir)
        if os.path.exists(old):
            shutil.rmtree(old)
    with open_write(join(stage_dir, SUCCESS)) as f:
        f.write(b"")


def read_json_lines(stage_dir: str, pattern: str) -> Iterator[Any]:
    """Streams the records of every gzip JSON-lines file matching ``pattern`` in a finished stage."""
    require_complete(stage_dir)
    for path in list_files(stage_dir, pattern):
        with open_read(path) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as f:
            for line in f:
                yield orjson.loads(line)
