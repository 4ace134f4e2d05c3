"""docker/: the compose file against the Compose specification's JSON schema, the services the
DAGs need (each with a healthcheck), and the image installed from the lock the tests' venv is
installed from. Offline: nothing is downloaded or built."""

import json
import re

import jsonschema
import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.unit

NEEDED = {
    "elasticsearch",
    "rabbitmq",
    "postgres",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "prodcat-consumer",
}


@pytest.fixture(scope="module")
def compose_schema():
    """The Compose spec schema, ``compose/config/compose_spec.json`` of docker-compose 1.29.2 (its last
    Python release, Apache-2.0), kept in tests/data."""
    return json.loads((REPO / "tests" / "data" / "compose_spec.json").read_text())


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((REPO / "docker" / "docker-compose.yaml").read_text())


def test_compose_file_is_valid_against_the_spec(compose, compose_schema):
    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft201909Validator(compose_schema).iter_errors(compose)]
    assert errors == []


def test_every_needed_service_is_there_with_a_healthcheck(compose):
    services = compose["services"]
    assert NEEDED <= set(services)
    for name in NEEDED:
        assert services[name].get("healthcheck", {}).get("test"), name
    assert services["elasticsearch"]["image"].startswith("docker.elastic.co/elasticsearch/elasticsearch:9.")
    assert "management" in services["rabbitmq"]["image"]


def test_airflow_connections_point_at_the_compose_services(compose):
    env = compose["services"]["airflow-scheduler"]["environment"]
    assert json.loads(env["AIRFLOW_CONN_PRODCAT_ELASTICSEARCH"])["host"] == "elasticsearch"
    assert json.loads(env["AIRFLOW_CONN_PRODCAT_RABBITMQ"])["host"] == "rabbitmq"


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path):
    """``{canonical name: version}`` of a lock file's ``name==version`` lines."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=<>~ ]+", line) for line in lines)
    return {canonical(line.split("==")[0]): line.split("==")[1] for line in lines}


def requirement_names(path):
    names = [re.split(r"[=\[<>~ ;]", line.strip(), maxsplit=1)[0] for line in path.read_text().splitlines()]
    return {canonical(n) for n in names if n and not n.startswith(("#", "-"))}


def test_image_and_test_venv_are_installed_under_the_same_lock_which_pins_every_requirement():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"pip install .*-r requirements\.txt -c requirements\.lock", dockerfile)
    assert "COPY requirements.txt requirements-dev.txt requirements.lock" in dockerfile
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert re.search(r'pip" install .*-r "\$ROOT/requirements-dev\.txt" -c "\$ROOT/requirements\.lock"', setup)
    assert "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text()
    lock = pins(REPO / "requirements.lock")
    missing = (requirement_names(REPO / "requirements.txt") | requirement_names(REPO / "requirements-dev.txt")) - set(lock)
    assert missing == set()
