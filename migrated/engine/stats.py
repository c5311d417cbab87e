"""Migration statistics, in the vocabulary operators know from QEMU's query-migrate.

Everything here is plain data plus a log2-microsecond latency histogram.  Times are
taken by the engines from ``time.monotonic()`` and handed in as seconds.
"""

from __future__ import annotations

import array
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LatencyHistogram", "MigrationStats", "Pacer", "StepTimer"]


class LatencyHistogram:
    """Counts of latencies in log2(µs) buckets: bucket k holds [2^(k-1), 2^k) µs
    (bucket 0: below 1 µs).  Raw samples are kept too, up to ``max_samples``, so
    percentiles are exact for realistic fault counts and bucket-bounded beyond."""

    NBUCKETS = 32

    def __init__(self, max_samples: int = 1 << 20) -> None:
        self.buckets = [0] * self.NBUCKETS
        self.count = 0
        self.total_us = 0.0
        self.max_us = 0.0
        self._samples = array.array("d")
        self._max_samples = max_samples

    def record(self, seconds: float) -> None:
        us = seconds * 1e6
        k = 0 if us < 1 else min(self.NBUCKETS - 1, int(math.log2(us)) + 1)
        self.buckets[k] += 1
        self.count += 1
        self.total_us += us
        self.max_us = max(self.max_us, us)
        if len(self._samples) < self._max_samples:
            self._samples.append(us)

    def percentile_us(self, p: float) -> float | None:
        """The p-th percentile (0..100) in µs, or None without samples."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        i = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
        return ordered[i]

    def to_dict(self) -> dict[str, Any]:
        last = max((k for k, n in enumerate(self.buckets) if n), default=-1)

        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 1)

        return {
            "count": self.count,
            "mean_us": r(self.total_us / self.count) if self.count else None,
            "p50_us": r(self.percentile_us(50)),
            "p90_us": r(self.percentile_us(90)),
            "p99_us": r(self.percentile_us(99)),
            "max_us": r(self.max_us) if self.count else None,
            # "<2^k us": count, for every bucket up to the last non-empty one
            "log2_us_buckets": {f"<{1 << k}us": self.buckets[k] for k in range(last + 1)},
        }


class Pacer:
    """Keeps a sending rate at or under ``limit_bytes_per_s`` (0: no limit).  The
    window restarts every second, so a pause in sending earns no burst later."""

    def __init__(self, limit_bytes_per_s: int) -> None:
        self.limit = limit_bytes_per_s
        self._t0 = time.monotonic()
        self._nbytes = 0

    def delay_s(self, nbytes: int) -> float:
        """Account ``nbytes`` just sent; returns how long to wait before sending more."""
        if not self.limit:
            return 0.0
        now = time.monotonic()
        if now - self._t0 > 1.0:
            self._t0, self._nbytes = now, 0
        self._nbytes += nbytes
        ahead = self._nbytes / self.limit - (now - self._t0)
        return ahead if ahead > 0.001 else 0.0


class StepTimer:
    """Records the milliseconds each named step took into ``into`` (a stats dict)."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into = into
        self.last = time.monotonic()

    def mark(self, step: str) -> None:
        now = time.monotonic()
        self.into[step] = round((now - self.last) * 1e3, 3)
        self.last = now


@dataclass
class MigrationStats:
    """One side's view of a migration.  ``status`` uses QEMU's words."""

    role: str
    mode: str = ""
    status: str = "setup"
    vm_name: str = ""
    ram_bytes: int = 0
    total_pages: int = 0
    # times (seconds; wall-clock instants are monotonic seconds inside the process)
    setup_s: float = 0.0
    precopy_s: float = 0.0
    downtime_s: float = 0.0
    postcopy_s: float = 0.0
    total_s: float = 0.0
    # what moved
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    duplicate_pages: int = 0
    discarded_pages: int = 0
    precopy_rounds: int = 0
    dirty_pages_per_round: list[int] = field(default_factory=list)
    dirty_rate_pages_per_s: float = 0.0
    # postcopy
    postcopy_requests: int = 0
    postcopy_requested_pages: int = 0
    urgent_pages_sent: int = 0
    fault_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    blocktime_s_per_vcpu: dict[int, float] = field(default_factory=dict)
    prefault: dict[str, Any] = field(default_factory=dict)
    recoveries: int = 0
    #: source: which connection carried the postcopy push ("bulk" or "main")
    push_channel: str = ""
    #: destination: seconds inside UFFDIO_COPY/UFFDIO_ZEROPAGE (all install calls)
    install_s: float = 0.0
    #: where the downtime went, step -> milliseconds (each side measures its own steps)
    downtime_breakdown_ms: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def transferred_bytes(self) -> int:
        return self.precopy_bytes + self.downtime_bytes + self.postcopy_bytes

    def throughput_bytes_per_s(self) -> float:
        return self.ram_bytes / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fault_latency"] = self.fault_latency.to_dict()
        d["transferred_bytes"] = self.transferred_bytes
        d["throughput_bytes_per_s"] = round(self.throughput_bytes_per_s())
        d["blocktime_s_per_vcpu"] = {
            str(k): round(v, 6) for k, v in sorted(self.blocktime_s_per_vcpu.items())
        }
        for k in ("setup_s", "precopy_s", "downtime_s", "postcopy_s", "total_s"):
            d[k] = round(d[k], 6)
        d["dirty_rate_pages_per_s"] = round(self.dirty_rate_pages_per_s, 1)
        return d
