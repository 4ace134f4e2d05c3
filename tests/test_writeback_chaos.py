"""Write-back under the combined faults of issue 13 (consumer killed, broker restarted, the
Elasticsearch stand-in stopped, poison messages, an old version replayed), against the real RabbitMQ
and the stand-in: the reconciler brings every product to the newest version."""

import pytest

from benchmarks.chaos import Faults, run_chaos

from conftest import ES_PORT, start_elasticsearch, stop_elasticsearch

pytestmark = pytest.mark.service


def test_combined_faults_leave_every_product_at_the_newest_version_and_poison_dead_lettered(es, es_url, rabbit_vhost, unique, tmp_path):
    faults = Faults(kill_consumer_at=3, broker_restart_at=5, broker_down_s=4, es_stop_at=10, es_down_s=6, rate_limit=250)
    result = run_chaos(
        es,
        es_url,
        lambda: stop_elasticsearch(ES_PORT),
        lambda: start_elasticsearch(ES_PORT),
        rabbit_vhost,
        tmp_path,
        updates=3000,
        unique=unique,
        faults=faults,
    )
    assert result["lost"] == 0
    assert result["older_overwrote_newer"] == 0
    reasons = sorted(d["reason"].split(":")[0] for d in result["dead_letter_queue"])
    assert reasons == ["http_404", "invalid_json", "invalid_schema", "invalid_schema", "unsupported_schema_version"]
    assert all(d["header"] == d["reason"][:200] for d in result["dead_letter_queue"])
    assert sorted(r.split(":")[0] for r in result["dead_letter_index"]) == reasons
