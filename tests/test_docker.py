"""docker/: the compose file against the Compose specification's JSON schema, the services the
DAGs need (each with a healthcheck), and the image's package set being the tested one."""
import json
import re
import subprocess
import sys
import zipfile

import jsonschema
import pytest
import yaml

from conftest import REPO

NEEDED = {"elasticsearch", "rabbitmq", "postgres", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
          "airflow-triggerer", "prodcat-consumer"}


@pytest.fixture(scope="module")
def compose_schema():
    """The Compose spec schema as shipped in docker-compose's last Python release (from PyPI)."""
    cache = REPO / ".prodcat" / "compose-spec"
    wheels = list(cache.glob("docker_compose-1.29.2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "docker-compose==1.29.2", "-d", str(cache)],
                       check=True)
        wheels = list(cache.glob("docker_compose-1.29.2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        return json.loads(wheel.read("compose/config/compose_spec.json"))


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


def test_image_installs_the_pinned_set_the_tests_run_on():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"pip install .*-r requirements\.txt -c requirements\.lock", dockerfile)
    assert "COPY requirements.txt requirements-dev.txt requirements.lock" in dockerfile
    lock = {canonical(line.split("==")[0]): line.split("==")[1] for line in (REPO / "requirements.lock").read_text().split()}
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True).stdout
    installed = {canonical(line.split("==")[0]): line.split("==")[1] for line in frozen.split() if "==" in line}
    assert installed == lock
    for line in (REPO / "requirements.txt").read_text().splitlines():
        name = canonical(re.split(r"[=\[<> ]", line.strip(), maxsplit=1)[0])
        if name and not name.startswith("#"):
            assert name in lock, name
