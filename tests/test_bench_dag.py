"""The DAG benchmark's per-stage and write-back figures from task instance times and samples."""

import pytest

from benchmarks.dag import stage_figures, write_back_figures

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


def test_the_write_back_runs_from_categorisations_publish_to_the_last_wait_and_counts_the_stand_ins_cpu_in_it():
    tasks = {
        "categorise": [
            ("predict", "success", 90.0, 100.0),
            ("publish", "success", 100.5, 108.0),
            ("wait_indexed", "success", 140.0, 150.0),
        ],
        "visual_neighbours": [("publish", "success", 120.0, 122.0), ("wait_indexed", "success", 150.0, 160.5)],
    }
    cpu = [(99.9, 5.0), (100.4, 5.2), (100.9, 5.6), (160.4, 52.0), (160.9, 52.3), (161.4, 52.3)]
    assert write_back_figures(tasks, cpu, 43_000) == {
        "updates": 43_000,
        "seconds": 60.0,
        "updates_per_s": 717,
        # the last sample at or before the start, the first at or after the end
        "stand_in_cpu_s": 47.1,
    }


def test_the_write_back_leaves_the_stand_ins_cpu_out_when_no_sample_covers_the_span():
    tasks = {"categorise": [("publish", "success", 100.0, 101.0), ("wait_indexed", "success", 101.0, 110.0)]}
    assert "stand_in_cpu_s" not in write_back_figures(tasks, [(105.0, 1.0)], 10)
