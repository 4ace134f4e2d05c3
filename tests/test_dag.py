"""DAG integrity: imports cleanly, no heavy imports at parse time, the task graph, schedule, params,
every task name resolves, timeouts agree."""

import ast
import copy
import subprocess
import sys
from datetime import timedelta

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit

HEAVY = ("tensorflow", "tensorflow_transform", "apache_beam", "torch", "scann", "services.scann_search", "elasticsearch", "pika")


DAG_IDS = ("prodcat_categorise", "prodcat_import_labels", "prodcat_replay_dead_letters", "prodcat_visual_neighbours")


@pytest.fixture(scope="module")
def bag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    assert sorted(bag.dags) == list(DAG_IDS)
    return bag


@pytest.fixture(scope="module")
def dag(bag):
    return bag.dags["prodcat_categorise"]


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dag_file_imports_nothing_heavy_at_parse_time(dag_id):
    code = f"import runpy, sys; runpy.run_path(sys.argv[1]);print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "dags" / f"{dag_id}.py")], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_task_graph(dag):
    upstream = {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}
    assert upstream == {
        "dump": [],
        "preprocess": ["dump"],
        "validate_statistics": ["preprocess"],
        "train": ["validate_statistics"],
        "evaluate": ["preprocess", "train"],
        "predict": ["evaluate", "preprocess"],
        "publish": ["predict"],
        "write_review": ["predict"],
        "wait_indexed": ["publish"],
        "report": ["wait_indexed"],
    }


def test_visual_neighbours_dag_runs_on_new_predictions(bag):
    similar = bag.dags["prodcat_visual_neighbours"]
    assert {t.task_id: sorted(t.upstream_task_ids) for t in similar.tasks} == {
        "neighbours": [],
        "publish": ["neighbours"],
        "wait_indexed": ["publish"],
        "report": ["wait_indexed"],
    }
    (predict_outlet,) = bag.dags["prodcat_categorise"].get_task("predict").outlets
    assert [a.uri for a in similar.timetable.asset_condition.objects] == [predict_outlet.uri]


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_schedule_and_run_policy(bag, dag_id):
    dag = bag.dags[dag_id]
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert "prodcat" in dag.tags and dag.doc_md
    assert all(t.retries == 2 and t.retry_exponential_backoff and t.execution_timeout is not None for t in dag.tasks)
    schedules = {"prodcat_categorise": "@weekly", "prodcat_replay_dead_letters": None, "prodcat_import_labels": None}
    if dag_id in schedules:
        assert dag.schedule == schedules[dag_id]


@pytest.mark.parametrize("dag_id", ["prodcat_categorise", "prodcat_visual_neighbours"])
def test_wait_indexed_is_a_rescheduling_sensor_with_the_configured_limits(bag, dag_id):
    from core.config import load_config

    publish = load_config(REPO / "feature_config.yaml").publish
    sensor = bag.dags[dag_id].get_task("wait_indexed")
    assert sensor.mode == "reschedule"
    assert (sensor.poke_interval, sensor.timeout) == (publish.reconcile_poke_s, publish.reconcile_timeout_s)
    # a poke may not outlive the wait it belongs to, nor the wait its DAG's stages
    assert sensor.execution_timeout == timedelta(seconds=sensor.timeout)
    stages = [t for t in bag.dags[dag_id].tasks if t.task_id != "wait_indexed"]
    assert all(sensor.execution_timeout <= t.execution_timeout for t in stages)


def test_the_stage_dags_share_run_params_and_retry_policy(bag):
    categorise, neighbours = bag.dags["prodcat_categorise"], bag.dags["prodcat_visual_neighbours"]
    for name in ("beam_runner", "beam_options", "data_root"):
        assert categorise.params.get_param(name).dump() == neighbours.params.get_param(name).dump()
    assert {(t.retries, t.retry_delay, t.retry_exponential_backoff) for t in categorise.tasks + neighbours.tasks} == {
        (2, timedelta(minutes=1), True)
    }


def entry_point_calls(dag_file):
    """``(airflow_entry function, task name or None)`` of each call a DAG file's tasks make."""
    tree = ast.parse(dag_file.read_text(encoding="utf-8"))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "entrypoints.airflow_entry"
        for alias in node.names
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
            first = node.args[0] if node.args else None
            yield node.func.id, first.value if node.func.id == "run_task" and isinstance(first, ast.Constant) else None


def test_every_task_name_the_dags_and_the_cli_use_is_registered():
    from entrypoints import airflow_entry, cli, tasks

    calls = [call for path in sorted((REPO / "dags").glob("*.py")) for call in entry_point_calls(path)]
    assert {function for function, _ in calls} == {"run_task", "poke_indexed", "run_replay", "run_neighbours", "run_import_labels"}
    assert all(callable(getattr(airflow_entry, function)) for function, _ in calls)
    names = {name for function, name in calls if function == "run_task"}
    assert names == {
        "dump",
        "preprocess",
        "validate_statistics",
        "train",
        "evaluate",
        "predict",
        "write_review",
        "publish_predictions",
        "publish_neighbours",
        "report",
    }
    assert names <= set(tasks.TASKS) and set(cli.STAGES) == set(tasks.TASKS)
    assert all(callable(f) for f in tasks.TASKS.values())


def test_default_params_validate(dag):
    validated = copy.deepcopy(dag.params).validate()
    assert validated["model_type"] == "wide_deep" and validated["limit"] is None


@pytest.mark.parametrize(
    "name, value",
    [
        ("model_type", "xgboost"),
        ("limit", -5),
        ("limit", 0),
        ("force_publish", "yes"),
        ("beam_runner", "LocalRunner"),
        ("categories", "Apparel"),
    ],
)
def test_invalid_params_are_refused(dag, name, value):
    from airflow.sdk.exceptions import ParamValidationError

    params = copy.deepcopy(dag.params)
    with pytest.raises(ParamValidationError, match=name):
        params[name] = value
        params.validate()


def test_the_label_import_dag_needs_a_csv_path_and_calls_its_task(bag):
    from airflow.sdk.exceptions import ParamValidationError

    dag = bag.dags["prodcat_import_labels"]
    assert [t.task_id for t in dag.tasks] == ["import_labels"]
    with pytest.raises(ParamValidationError, match="csv_path"):
        copy.deepcopy(dag.params).validate()
    params = copy.deepcopy(dag.params)
    params["csv_path"] = "/tmp/labels.csv"
    assert params.validate()["csv_path"] == "/tmp/labels.csv"
