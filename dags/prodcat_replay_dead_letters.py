"""
### prodcat: replay dead letters

Manual only. After a fix (a mapping, the consumer, a deleted product restored), moves the dead
letters that match the params from the dead-letter queue back to the update queue, as Logstash's
dead-letter-queue input does; the consumer applies them (versioned: never over a newer update) or
dead-letters them again with their reason. The others stay in the dead-letter queue. The dead-letter
index keeps the history of every dead letter.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from entrypoints.dag_defaults import CONFIG_PATH, operations_dag_args

PARAMS = {
    "run_id": Param(None, type=["null", "string"], description="Only the dead letters of this run (default: all)."),
    "reason_contains": Param(
        None, type=["null", "string"], description="Only dead letters whose reason contains this text, e.g. http_404."
    ),
}


@dag(
    dag_id="prodcat_replay_dead_letters",
    params=PARAMS,
    doc_md=__doc__,
    **operations_dag_args(),
)
def prodcat_replay_dead_letters():
    @task
    def replay() -> dict:
        from entrypoints.airflow_entry import run_replay

        return run_replay(CONFIG_PATH)

    replay()


prodcat_replay_dead_letters()
