"""The DAG benchmark's per-stage figures from task instance times and RSS samples."""

import pytest

from benchmarks.dag import stage_figures

pytestmark = pytest.mark.unit

MB = 2**20


def test_a_stage_runs_from_the_previous_ones_end_and_takes_its_largest_sample():
    tasks = [("dump", "success", 100.0, 110.0), ("publish", "success", 110.0, 110.2), ("wait_indexed", "success", 125.0, 126.0)]
    samples = [(101.0, 300 * MB), (109.0, 500 * MB), (110.5, 450 * MB), (120.0, 900 * MB), (126.5, 100 * MB)]
    assert stage_figures(tasks, samples, "categorise") == {
        "categorise.dump": {"seconds": 10.0, "peak_rss_mb": 500},
        # shorter than the sampling interval: the first sample after it
        "categorise.publish": {"seconds": 0.2, "peak_rss_mb": 450},
        # a sensor's reschedule wait (from publish's end) counts
        "categorise.wait_indexed": {"seconds": 15.8, "peak_rss_mb": 900},
    }


def test_a_failed_task_fails_the_measurement():
    with pytest.raises(RuntimeError, match="categorise.train ended failed"):
        stage_figures([("train", "failed", 0.0, 1.0)], [], "categorise")
