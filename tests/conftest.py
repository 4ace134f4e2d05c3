"""Shared fixtures: the real local services, isolated from a demo run.

Tests get their own Elasticsearch stand-in (port 9250, own data folder) and their own
RabbitMQ virtual host, both started here when missing.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ES_PORT = 9250
VHOST = "prodcat-test"
AIRFLOW_HOME = REPO / ".prodcat" / "test-airflow"
TIERS = ("unit", "service", "e2e")  # the markers of pyproject.toml; each test module carries one


def pytest_configure(config):
    """A private Airflow home (SQLite) for the tests, set before Airflow is first imported."""
    import os

    AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(AIRFLOW_HOME)
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"


def pytest_collection_modifyitems(items):
    """Refuses a test with no tier marker, so that ``-m unit`` cannot silently leave one out."""
    unmarked = sorted({item.nodeid.split("::")[0] for item in items if not any(item.get_closest_marker(t) for t in TIERS)})
    if unmarked:
        raise pytest.UsageError(f"tests without one of the markers {list(TIERS)} (pytestmark = pytest.mark.unit ...): {unmarked}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(check, what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up in {seconds}s")


def start_elasticsearch(port: int = ES_PORT) -> str:
    if not _port_open(port):
        noida = Path(sys.executable).parent / "noida-db"
        data = REPO / ".prodcat" / f"test-noida-{port}"
        data.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(noida), "up", "--data-dir", str(data), "--only", "elasticsearch", "--elasticsearch-port", str(port)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(lambda: _port_open(port), "Elasticsearch stand-in", 60)
    return f"http://127.0.0.1:{port}"


def stop_elasticsearch(port: int = ES_PORT) -> None:
    noida = Path(sys.executable).parent / "noida-db"
    subprocess.run(
        [str(noida), "down", "--data-dir", str(REPO / ".prodcat" / f"test-noida-{port}")],
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_rabbitmq() -> None:
    if not _port_open(5672):
        subprocess.run(["rabbitmq-server", "-detached"], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: _port_open(5672), "RabbitMQ", 120)
    subprocess.run(["rabbitmqctl", "await_startup"], check=True, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def es_url():
    """The tests' stand-in; stopped at the end of the session if this session started it."""
    started_here = not _port_open(ES_PORT)
    yield start_elasticsearch()
    if started_here:
        stop_elasticsearch()


@pytest.fixture(scope="session")
def rabbit_vhost():
    from services.publish import RabbitConnection

    start_rabbitmq()
    subprocess.run(["rabbitmqctl", "add_vhost", VHOST], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*"], check=True, stdout=subprocess.DEVNULL)
    return RabbitConnection(virtual_host=VHOST)


@pytest.fixture
def es(es_url):
    from services.search_index import EsConnection

    return EsConnection(url=es_url).client()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def gcs_bucket(monkeypatch):
    """A bucket on gcp-storage-emulator, reached through the real google-cloud-storage client."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "gcp-storage-emulator"), "start", "--port", str(port), "--in-memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    gcs.Client(project="prodcat-test", credentials=AnonymousCredentials()).create_bucket("prodcat-runs")
    yield "gs://prodcat-runs"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def fashion_slice() -> Path:
    return REPO / "data" / "fashion_slice"


@pytest.fixture(scope="session")
def image_server(fashion_slice):
    from services.image_server import make_server

    server = make_server(str(fashion_slice / "images"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    out = REPO / "test-artifacts"
    out.mkdir(exist_ok=True)
    return out
