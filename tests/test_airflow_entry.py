"""The Airflow entry point's Google Cloud connection: credentials and project reach Google's
client libraries and Dataflow for the task's duration only."""
import json
import os
import stat

import pytest
from airflow.sdk import Connection

from pipelines import airflow_entry

KEY = {"type": "service_account", "project_id": "acme-catalogue", "private_key_id": "k1"}


def test_keyfile_dict_is_written_owner_only(tmp_path):
    conn = Connection(conn_id="prodcat_google_cloud", conn_type="google_cloud_platform",
                      extra=json.dumps({"project": "acme-catalogue", "keyfile_dict": json.dumps(KEY)}))
    env = airflow_entry.google_cloud_env(conn, str(tmp_path))
    assert env["GOOGLE_CLOUD_PROJECT"] == "acme-catalogue"
    key_file = env["GOOGLE_APPLICATION_CREDENTIALS"]
    assert json.loads(open(key_file).read()) == KEY
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_key_path_and_prefixed_field_names(tmp_path):
    conn = Connection(conn_id="prodcat_google_cloud", conn_type="google_cloud_platform",
                      extra=json.dumps({"extra__google_cloud_platform__key_path": "/secrets/sa.json"}))
    assert airflow_entry.google_cloud_env(conn, str(tmp_path)) == {"GOOGLE_APPLICATION_CREDENTIALS": "/secrets/sa.json"}
    assert list(tmp_path.iterdir()) == []


def test_no_key_means_application_default_credentials(tmp_path):
    conn = Connection(conn_id="prodcat_google_cloud", conn_type="google_cloud_platform")
    assert airflow_entry.google_cloud_env(conn, str(tmp_path)) == {}


def test_credentials_are_set_while_the_task_runs_and_removed_after(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_PRODCAT_GOOGLE_CLOUD", json.dumps(
        {"conn_type": "google_cloud_platform", "extra": {"project": "acme-catalogue", "keyfile_dict": KEY}}))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "before")
    with airflow_entry.google_cloud_credentials():
        key_file = os.environ["GOOGLE_APPLICATION_CREDENTIALS"]
        assert json.loads(open(key_file).read()) == KEY
        assert os.environ["GOOGLE_CLOUD_PROJECT"] == "acme-catalogue"
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in os.environ
    assert not os.path.exists(key_file)
    assert os.environ["GOOGLE_CLOUD_PROJECT"] == "before"


def test_without_the_connection_nothing_changes(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_PRODCAT_GOOGLE_CLOUD", raising=False)
    before = dict(os.environ)
    with airflow_entry.google_cloud_credentials():
        assert dict(os.environ) == before


@pytest.mark.parametrize("params,project,expected", [
    ({}, "acme", ("--runner=DirectRunner",)),
    ({"beam_runner": "DataflowRunner", "beam_options": ["--region=europe-west1"]}, "acme",
     ("--runner=DataflowRunner", "--region=europe-west1", "--project=acme")),
    ({"beam_runner": "DataflowRunner", "beam_options": ["--project=other"]}, "acme",
     ("--runner=DataflowRunner", "--project=other")),
    ({"beam_runner": "FlinkRunner", "beam_options": ["--flink_master=f:8081"]}, "acme",
     ("--runner=FlinkRunner", "--flink_master=f:8081")),
])
def test_beam_arguments(params, project, expected):
    assert airflow_entry.beam_arguments(params, project) == expected
