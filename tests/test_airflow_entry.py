"""The Airflow entry point's connections: Elasticsearch and RabbitMQ endpoints with their secrets
kept out of reprs; Google Cloud credentials and project reach Google's client libraries and Dataflow
for the task's duration only."""

import json
import os
import stat

import pytest
from airflow.sdk import Connection

from entrypoints import airflow_entry

pytestmark = pytest.mark.unit

KEY = {"type": "service_account", "project_id": "acme-catalogue", "private_key_id": "k1"}


def test_keyfile_dict_is_written_owner_only(tmp_path):
    conn = Connection(
        conn_id="prodcat_google_cloud",
        conn_type="google_cloud_platform",
        extra=json.dumps({"project": "acme-catalogue", "keyfile_dict": json.dumps(KEY)}),
    )
    env = airflow_entry.google_cloud_env(conn, str(tmp_path))
    assert env["GOOGLE_CLOUD_PROJECT"] == "acme-catalogue"
    key_file = env["GOOGLE_APPLICATION_CREDENTIALS"]
    assert json.loads(open(key_file).read()) == KEY
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_key_path_and_prefixed_field_names(tmp_path):
    conn = Connection(
        conn_id="prodcat_google_cloud",
        conn_type="google_cloud_platform",
        extra=json.dumps({"extra__google_cloud_platform__key_path": "/secrets/sa.json"}),
    )
    assert airflow_entry.google_cloud_env(conn, str(tmp_path)) == {"GOOGLE_APPLICATION_CREDENTIALS": "/secrets/sa.json"}
    assert list(tmp_path.iterdir()) == []


def test_no_key_means_application_default_credentials(tmp_path):
    conn = Connection(conn_id="prodcat_google_cloud", conn_type="google_cloud_platform")
    assert airflow_entry.google_cloud_env(conn, str(tmp_path)) == {}


def test_credentials_are_set_while_the_task_runs_and_removed_after(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_PRODCAT_GOOGLE_CLOUD",
        json.dumps({"conn_type": "google_cloud_platform", "extra": {"project": "acme-catalogue", "keyfile_dict": KEY}}),
    )
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "before")
    with airflow_entry.google_cloud_credentials() as project:
        assert project == "acme-catalogue"
        key_file = os.environ["GOOGLE_APPLICATION_CREDENTIALS"]
        assert json.loads(open(key_file).read()) == KEY
        assert os.environ["GOOGLE_CLOUD_PROJECT"] == "acme-catalogue"
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in os.environ
    assert not os.path.exists(key_file)
    assert os.environ["GOOGLE_CLOUD_PROJECT"] == "before"


def test_without_the_connection_nothing_changes(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_PRODCAT_GOOGLE_CLOUD", raising=False)
    before = dict(os.environ)
    with airflow_entry.google_cloud_credentials() as project:
        assert project is None
        assert dict(os.environ) == before


@pytest.mark.parametrize(
    "params,project,expected",
    [
        ({}, "acme", ("--runner=FnApiRunner",)),
        ({"beam_runner": "DirectRunner"}, "acme", ("--runner=DirectRunner",)),
        (
            {"beam_runner": "DataflowRunner", "beam_options": ["--region=europe-west1"]},
            "acme",
            ("--runner=DataflowRunner", "--region=europe-west1", "--project=acme"),
        ),
        ({"beam_runner": "DataflowRunner", "beam_options": ["--project=other"]}, "acme", ("--runner=DataflowRunner", "--project=other")),
        (
            {"beam_runner": "FlinkRunner", "beam_options": ["--flink_master=f:8081"]},
            "acme",
            ("--runner=FlinkRunner", "--flink_master=f:8081"),
        ),
    ],
)
def test_beam_arguments(params, project, expected):
    assert airflow_entry.beam_arguments(params, project) == expected


def test_service_connections_fill_endpoints_and_keep_secrets_out_of_reprs(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_PRODCAT_ELASTICSEARCH",
        json.dumps(
            {
                "conn_type": "elasticsearch",
                "host": "es.internal",
                "port": 9243,
                "login": "prodcat",
                "password": "es-secret",
                "extra": {"scheme": "https", "api_key": "key-secret"},
            }
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_PRODCAT_RABBITMQ",
        json.dumps(
            {"conn_type": "amqp", "host": "mq.internal", "port": 5671, "login": "prodcat", "password": "mq-secret", "schema": "catalogue"}
        ),
    )
    es, rabbit = airflow_entry.es_connection(), airflow_entry.rabbit_connection()
    assert (es.url, es.username, es.password, es.api_key) == ("https://es.internal:9243", "prodcat", "es-secret", "key-secret")
    assert (rabbit.host, rabbit.port, rabbit.username, rabbit.password, rabbit.virtual_host) == (
        "mq.internal",
        5671,
        "prodcat",
        "mq-secret",
        "catalogue",
    )
    printed = repr(es) + repr(rabbit)
    assert "es.internal" in printed and "mq.internal" in printed
    assert not any(secret in printed for secret in ("es-secret", "key-secret", "mq-secret"))


def test_without_service_connections_the_local_defaults(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_PRODCAT_ELASTICSEARCH", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_PRODCAT_RABBITMQ", raising=False)
    assert airflow_entry.es_connection().url == "http://127.0.0.1:9200"
    assert (airflow_entry.rabbit_connection().host, airflow_entry.rabbit_connection().port) == ("127.0.0.1", 5672)


def test_a_wait_due_sooner_than_the_poke_interval_is_rescheduled_then():
    from datetime import UTC, datetime, timedelta

    from airflow.sdk.exceptions import AirflowRescheduleException

    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert airflow_entry.poke_result("/runs/r/indexed", None, now).xcom_value == "/runs/r/indexed"
    assert not airflow_entry.poke_result(None, None, now).is_done
    with pytest.raises(AirflowRescheduleException) as rescheduled:
        airflow_entry.poke_result(None, 3.5, now)
    assert rescheduled.value.reschedule_date == now + timedelta(seconds=3.5)
