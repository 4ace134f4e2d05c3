"""The neighbours stage's searchers written to a ``gs://`` folder (GCS emulator)."""

import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline

from core import storage
from core.config import LOCAL_BEAM_RUNNER, Neighbours
from pipelines.neighbours import AssignGroup, SearchNeighbours

pytestmark = pytest.mark.service


def test_search_neighbours_saves_a_loadable_group_searcher_into_a_gcs_folder(gcs_bucket, tmp_path):
    from services.scann_search import scann_ops_pybind

    members = [("a", [1.0, 0.0]), ("b", [0.8, 0.6]), ("c", [0.0, 1.0])]
    searchers = f"{gcs_bucket}/runs/r1/neighbours.tmp/searchers"
    with test_pipeline.TestPipeline(runner=LOCAL_BEAM_RUNNER) as p:
        groups = {"grouped": p | "Grouped" >> beam.Create([("A > A1", members)]), AssignGroup.ALONE: p | "Alone" >> beam.Create([])}
        _ = groups | SearchNeighbours(Neighbours(), searchers)
    paths = storage.list_files(searchers, "**")
    [group_dir] = {path.rsplit("/", 1)[0] for path in paths}
    assert storage.read_json(storage.join(group_dir, "group.json")) == {"group": "A > A1", "ids": ["a", "b", "c"]}
    local = tmp_path / "searcher"
    local.mkdir()
    for path in paths:
        with storage.open_read(path) as f:
            (local / os.path.basename(path)).write_bytes(f.read())
    found, _ = scann_ops_pybind.load_searcher(str(local)).search(np.asarray([0.6, 0.8], np.float32), final_num_neighbors=2)
    assert found.tolist() == [1, 2]
