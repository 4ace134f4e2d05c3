"""The Beam counters a finished pipeline reports, for a stage's summary."""

from __future__ import annotations

from typing import Dict

import apache_beam as beam


def beam_counters(result: beam.runners.runner.PipelineResult, namespace: str) -> Dict[str, int]:
    """A finished pipeline's counters of ``namespace``, by name."""
    query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(namespace))
    return dict(sorted((r.key.metric.name, r.committed) for r in query["counters"]))
