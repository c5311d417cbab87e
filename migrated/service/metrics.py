"""Prometheus metrics of the daemon (``prometheus_client``), off unless
``[metrics] listen`` is set.

Where KubeVirt exports the same thing, the name is KubeVirt's with ``migrated_`` for
``kubevirt_`` and the same meaning (per VM, label ``vm``):

=================================================  ========================================
``migrated_vmi_migration_data_bytes_total``        bytes moved by the migration (source)
``migrated_vmi_migration_data_remaining_bytes``    guest memory still to send (source)
``migrated_vmi_migration_dirty_memory_rate_bytes`` bytes dirtied per second (precopy)
``migrated_vmi_migration_memory_transfer_rate_bytes`` bytes moved per second
``migrated_vmi_migration_succeeded_total``         completed migrations (counter, ``role``)
``migrated_vmi_migration_failed_total``            failed migrations (counter, ``role``)
=================================================  ========================================

And what no anchor exports:

* ``migrated_migration_phase_bytes_total{vm,role,phase}``: bytes by phase
  (precopy, downtime, postcopy) of finished migrations;
* ``migrated_migration_downtime_seconds{vm,role}``: the last migration's downtime;
* ``migrated_postcopy_fault_latency_seconds{vm}``: histogram of the destination's
  page-fault latency (fault read to page installed), from the engine's log2-µs buckets;
* ``migrated_postcopy_vcpu_blocktime_seconds{vm,vcpu}``: time each vCPU waited for
  pages;
* ``migrated_migration_recoveries_total{vm}``: reconnections in postcopy;
* ``migrated_vms{state}``: VMs of this host by state (running, paused, migrating...);
* ``migrated_migrations{role,status}``: migrations in progress by session state.

Everything is computed at scrape time from the daemon's latest view of its VM
processes (polled every second) and from its own counters, so a scrape never blocks
the event loop and never talks to a VM process.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

__all__ = ["MetricsState", "start_metrics_server"]

PAGE_SIZE = 4096
FINISHED = ("completed", "failed", "cancelled")


class MetricsState:
    """What the collector reports.  The daemon replaces ``views`` (VM name -> the VM
    process' ``status`` answer) and calls the ``record_*`` methods; the HTTP thread
    only reads."""

    def __init__(self) -> None:
        self.views: dict[str, dict[str, Any]] = {}
        self.progress: dict[str, dict[str, Any]] = {}  # vm -> last progress event
        self.succeeded: Counter[tuple[str, str]] = Counter()  # (vm, role)
        self.failed: Counter[tuple[str, str]] = Counter()
        self.phase_bytes: Counter[tuple[str, str, str]] = Counter()
        self.data_bytes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record_result(self, vm: str, role: str, status: str, stats: dict[str, Any]) -> None:
        with self._lock:
            if status == "completed":
                self.succeeded[(vm, role)] += 1
            else:
                self.failed[(vm, role)] += 1
            for phase in ("precopy", "downtime", "postcopy"):
                self.phase_bytes[(vm, role, phase)] += int(stats.get(f"{phase}_bytes", 0))
            if role == "source":
                self.data_bytes[vm] += int(stats.get("transferred_bytes", 0))
            self.progress.pop(vm, None)


class MigratedCollector:
    def __init__(self, state: MetricsState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        st = self.state
        views = dict(st.views)
        with st._lock:
            succeeded, failed = dict(st.succeeded), dict(st.failed)
            phase_bytes, data_bytes = dict(st.phase_bytes), dict(st.data_bytes)
            progress = dict(st.progress)

        by_state: Counter[str] = Counter()
        migrations: Counter[tuple[str, str]] = Counter()
        remaining = GaugeMetricFamily(
            "migrated_vmi_migration_data_remaining_bytes",
            "Guest memory still to be sent by the running migration", labels=["vm"])  # fmt: skip
        rate = GaugeMetricFamily(
            "migrated_vmi_migration_memory_transfer_rate_bytes",
            "Bytes per second moved by the running migration", labels=["vm"])  # fmt: skip
        dirty = GaugeMetricFamily(
            "migrated_vmi_migration_dirty_memory_rate_bytes",
            "Bytes per second the guest dirtied during precopy", labels=["vm"])  # fmt: skip
        data = CounterMetricFamily(
            "migrated_vmi_migration_data_bytes",
            "Bytes moved by migrations of this VM from this host", labels=["vm"])  # fmt: skip
        downtime = GaugeMetricFamily(
            "migrated_migration_downtime_seconds",
            "Downtime of the last migration (source pause to destination running)",
            labels=["vm", "role"])  # fmt: skip
        recoveries = CounterMetricFamily(
            "migrated_migration_recoveries",
            "Postcopy reconnections of the last migration", labels=["vm"])  # fmt: skip
        blocktime = GaugeMetricFamily(
            "migrated_postcopy_vcpu_blocktime_seconds",
            "Time each vCPU waited for pages in postcopy (last migration)",
            labels=["vm", "vcpu"])  # fmt: skip
        latency = HistogramMetricFamily(
            "migrated_postcopy_fault_latency_seconds",
            "Page-fault latency on the destination: fault read to page installed",
            labels=["vm"])  # fmt: skip

        live_bytes: dict[str, int] = {}
        for name, view in sorted(views.items()):
            vm = view.get("vm") or {}
            mig = view.get("migration") or {}
            status = mig.get("status")
            role = mig.get("role", "")
            if status and status not in FINISHED:
                migrations[(role, status)] += 1
                by_state[f"migrating-{'out' if role == 'source' else 'in'}"] += 1
            else:
                by_state[str(vm.get("runstate", "none"))] += 1
            if not mig:
                continue
            if status and status not in FINISHED and role == "source":
                p = progress.get(name, {})
                total = int(mig.get("total_pages") or p.get("total_pages") or 0)
                left = p.get("pages_remaining", total)
                remaining.add_metric([name], float(left) * PAGE_SIZE)
                rate.add_metric([name], float(p.get("rate_bytes_per_s", 0)))
                live_bytes[name] = int(p.get("transferred_bytes", mig.get("transferred_bytes", 0)))
            dirty.add_metric([name], float(mig.get("dirty_rate_pages_per_s", 0.0)) * PAGE_SIZE)
            downtime.add_metric([name, role], float(mig.get("downtime_s", 0.0)))
            if role == "destination":
                recoveries.add_metric([name], float(mig.get("recoveries", 0)))
                for vcpu, secs in sorted((mig.get("blocktime_s_per_vcpu") or {}).items()):
                    blocktime.add_metric([name, str(vcpu)], float(secs))
                self._histogram(latency, name, mig.get("fault_latency") or {})
        for name in set(data_bytes) | set(live_bytes):
            data.add_metric([name], float(data_bytes.get(name, 0) + live_bytes.get(name, 0)))

        vms = GaugeMetricFamily("migrated_vms", "VMs of this host by state", labels=["state"])
        for state, n in sorted(by_state.items()):
            vms.add_metric([state], n)
        running = GaugeMetricFamily(
            "migrated_migrations", "Migrations in progress by role and session state",
            labels=["role", "status"])  # fmt: skip
        for (role, status), n in sorted(migrations.items()):
            running.add_metric([role, status], n)
        ok = CounterMetricFamily(
            "migrated_vmi_migration_succeeded", "Completed migrations by this host's role",
            labels=["vm", "role"])  # fmt: skip
        bad = CounterMetricFamily(
            "migrated_vmi_migration_failed", "Failed migrations by this host's role",
            labels=["vm", "role"])  # fmt: skip
        for (name, role), n in sorted(succeeded.items()):
            ok.add_metric([name, role], n)
        for (name, role), n in sorted(failed.items()):
            bad.add_metric([name, role], n)
        phases = CounterMetricFamily(
            "migrated_migration_phase_bytes", "Bytes moved by phase of finished migrations",
            labels=["vm", "role", "phase"])  # fmt: skip
        for (name, role, phase), n in sorted(phase_bytes.items()):
            phases.add_metric([name, role, phase], n)
        yield from (vms, running, ok, bad, data, remaining, rate, dirty, phases, downtime,
                    recoveries, blocktime, latency)  # fmt: skip

    @staticmethod
    def _histogram(family: HistogramMetricFamily, vm: str, hist: dict[str, Any]) -> None:
        """The engine's buckets ``"<2^k us": n`` (bucket k holds [2^(k-1), 2^k) µs)
        as cumulative Prometheus buckets ``le = 2^k µs`` in seconds."""
        count = int(hist.get("count") or 0)
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for key, n in (hist.get("log2_us_buckets") or {}).items():
            cumulative += int(n)
            upper_us = int(key.strip("<us"))
            buckets.append((repr(upper_us / 1e6), float(cumulative)))
        buckets.append(("+Inf", float(count)))
        total_s = float(hist.get("mean_us") or 0.0) * count / 1e6
        family.add_metric([vm], buckets, total_s)


def start_metrics_server(state: MetricsState, address: tuple[str, int]) -> Any:
    """Serve ``/metrics`` on ``address`` from a thread; returns the server (call
    ``shutdown()`` to stop it)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(MigratedCollector(state))
    server, _thread = start_http_server(address[1], addr=address[0], registry=registry)
    return server
