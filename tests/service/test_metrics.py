"""The collector on its own: the families and values a scrape shows for a given view
of the host (the systemd tests scrape a live daemon)."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from migrated.service.metrics import MetricsState, MigratedCollector, start_metrics_server

VIEW = {
    "vm": {"runstate": "running"},
    "migration": {
        "role": "destination",
        "status": "postcopy-active",
        "total_pages": 1000,
        "downtime_s": 0.004,
        "recoveries": 1,
        "fault_latency": {
            "count": 3,
            "mean_us": 100.0,
            "log2_us_buckets": {"<1us": 0, "<2us": 0, "<4us": 1, "<8us": 0, "<16us": 2},
        },
        "blocktime_s_per_vcpu": {"0": 0.25, "1": 0.5},
    },
}


def samples(state: MetricsState) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry()
    reg.register(MigratedCollector(state))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_destination_view() -> None:
    st = MetricsState()
    st.views = {"web1": VIEW}
    got = samples(st)
    assert (
        got[("migrated_migrations", (("role", "destination"), ("status", "postcopy-active")))] == 1
    )
    assert got[("migrated_vms", (("state", "migrating-in"),))] == 1
    hist = {
        k[1]: v for k, v in got.items() if k[0] == "migrated_postcopy_fault_latency_seconds_bucket"
    }
    le = {dict(labels)["le"]: v for labels, v in hist.items()}
    # cumulative, in seconds: le=4e-06 holds 1, le=1.6e-05 holds 3, +Inf = count
    assert le["4e-06"] == 1 and le["1.6e-05"] == 3 and le["+Inf"] == 3
    assert got[("migrated_postcopy_fault_latency_seconds_count", (("vm", "web1"),))] == 3
    assert (
        abs(got[("migrated_postcopy_fault_latency_seconds_sum", (("vm", "web1"),))] - 3e-4) < 1e-9
    )
    assert got[("migrated_postcopy_vcpu_blocktime_seconds", (("vcpu", "1"), ("vm", "web1")))] == 0.5
    assert got[("migrated_migration_recoveries_total", (("vm", "web1"),))] == 1


def test_source_progress_and_results() -> None:
    st = MetricsState()
    st.views = {"db": {"vm": {"runstate": "paused"},
                       "migration": {"role": "source", "status": "active", "total_pages": 1000,
                                     "dirty_rate_pages_per_s": 10.0}}}  # fmt: skip
    st.progress["db"] = {"pages_remaining": 250, "rate_bytes_per_s": 1e9, "transferred_bytes": 7}
    got = samples(st)
    assert got[("migrated_vmi_migration_data_remaining_bytes", (("vm", "db"),))] == 250 * 4096
    assert got[("migrated_vmi_migration_memory_transfer_rate_bytes", (("vm", "db"),))] == 1e9
    assert got[("migrated_vmi_migration_dirty_memory_rate_bytes", (("vm", "db"),))] == 40960
    assert got[("migrated_vmi_migration_data_bytes_total", (("vm", "db"),))] == 7
    st.views = {}
    st.record_result("db", "source", "completed",
                     {"precopy_bytes": 5, "downtime_bytes": 1, "postcopy_bytes": 2,
                      "transferred_bytes": 8})  # fmt: skip
    st.record_result("db", "source", "failed", {})
    got = samples(st)
    assert got[("migrated_vmi_migration_succeeded_total", (("role", "source"), ("vm", "db")))] == 1
    assert got[("migrated_vmi_migration_failed_total", (("role", "source"), ("vm", "db")))] == 1
    assert got[("migrated_migration_phase_bytes_total",
                (("phase", "precopy"), ("role", "source"), ("vm", "db")))] == 5  # fmt: skip
    assert got[("migrated_vmi_migration_data_bytes_total", (("vm", "db"),))] == 8


def test_http_endpoint() -> None:
    st = MetricsState()
    st.views = {"web1": VIEW}
    server = start_metrics_server(st, ("127.0.0.1", 0))
    try:
        port = server.server_address[1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b'migrated_postcopy_fault_latency_seconds_count{vm="web1"} 3.0' in body
    finally:
        server.shutdown()
