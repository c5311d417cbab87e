"""Scale: many vCPUs, a large guest, several migrations at once; prints one JSON object.

    .venv/bin/python bench/scale.py                      # every scenario
    .venv/bin/python bench/scale.py --only concurrent    # one of them

Scenarios (memstress guests, loopback, both sides on this host):

- ``single``: one 1 GiB, 1-vCPU postcopy migration, the reference for ``concurrent``;
- ``concurrent``: four 1 GiB migrations started together (four VMs, four receivers);
  each one's total time and fault p99 beside ``single``'s;
- ``vcpus8``: 8 vCPUs, each writing its own slice, 1 GiB, postcopy and hybrid; per-vCPU
  blocktime;
- ``big``: a 10 GiB guest (``--big-mib``), postcopy; total time and the peak RSS of both
  processes.

Every migrated guest is verified on arrival (``verify_ok``).  Free page reporting is off
for the run and memory warmed, as in ``bench/migrate.py`` (see ``bench/hostprep.py``).
Not a test: no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.hostprep import run_with_reporting_off, warm_host_memory
from bench.migrate import peak_rss_bytes
from migrated.demo import LocalPair

SCENARIOS = ("single", "concurrent", "vcpus8", "big")


def summary(stats: dict[str, Any], dst: dict[str, Any], verify: dict[str, Any]) -> dict[str, Any]:
    lat = dst.get("fault_latency") or {}
    return {
        "total_s": stats.get("total_s"),
        "downtime_ms": round((stats.get("downtime_s") or 0) * 1e3, 2),
        "fault_p50_us": lat.get("p50_us"),
        "fault_p99_us": lat.get("p99_us"),
        "postcopy_requests": dst.get("postcopy_requests"),
        "blocktime_s_all_vcpus": round(sum((dst.get("blocktime_s_per_vcpu") or {}).values()), 4),
        "verify_ok": bool(verify.get("ok")),
    }


async def migrations(
    n: int, memory_mib: int, vcpus: int, mode: str, hot_set_mib: int
) -> list[dict[str, Any]]:
    """Boot ``n`` pairs, migrate them all at once, verify each; one summary per pair."""
    pairs = [
        LocalPair(memory_mib=memory_mib, vcpus=vcpus, hot_set_mib=hot_set_mib) for _ in range(n)
    ]
    try:
        await asyncio.gather(*(p.start(timeout_s=900) for p in pairs))
        warm_host_memory(n * (memory_mib << 20) + (256 << 20))
        t = time.monotonic()
        results = await asyncio.gather(*(p.migrate(mode) for p in pairs))
        wall = time.monotonic() - t
        out = []
        for p, r in zip(pairs, results, strict=True):
            assert p.dest is not None and p.source is not None
            dst_rss = peak_rss_bytes(p.dest.pid)
            verify = await p.verify_dest(timeout_s=600)
            dst = (await p.dest_status()).get("migration") or {}
            s = summary(r.get("stats") or {}, dst, verify)
            s["status"] = r.get("status")
            s["dest_peak_rss_bytes"] = dst_rss
            if vcpus > 1:
                s["blocktime_s_per_vcpu"] = dst.get("blocktime_s_per_vcpu")
            out.append(s)
        out.append({"wall_s_all": round(wall, 3)})
        return out
    finally:
        for p in pairs:
            p.stop()


async def big(memory_mib: int) -> dict[str, Any]:
    pair = LocalPair(memory_mib=memory_mib, vcpus=1, hot_set_mib=64)
    try:
        t = time.monotonic()
        await pair.start(timeout_s=1200)
        boot_s = time.monotonic() - t
        assert pair.source is not None and pair.dest is not None
        src_rss = peak_rss_bytes(pair.source.pid)  # its RAM is all resident once filled
        warm_host_memory((memory_mib << 20) + (256 << 20))
        r = await pair.migrate("postcopy")
        dst_rss = peak_rss_bytes(pair.dest.pid)
        verify = await pair.verify_dest(timeout_s=1200)
        dst = (await pair.dest_status()).get("migration") or {}
        s = summary(r.get("stats") or {}, dst, verify)
        s.update(
            status=r.get("status"),
            boot_s=round(boot_s, 1),
            guest_bytes=memory_mib << 20,
            source_peak_rss_bytes=src_rss,
            dest_peak_rss_bytes=dst_rss,
            dest_overhead_bytes=dst_rss - (memory_mib << 20),
        )
        return s
    finally:
        pair.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    want = args.only or SCENARIOS
    if "single" in want:
        out["single"] = (await migrations(1, 1024, 1, "postcopy", 64))[0]
    if "concurrent" in want:
        runs = await migrations(4, 1024, 1, "postcopy", 64)
        out["concurrent"] = {"migrations": runs[:-1], **runs[-1]}
    if "vcpus8" in want:
        out["vcpus8"] = {
            mode: (await migrations(1, 1024, 8, mode, 8))[0] for mode in ("postcopy", "hybrid")
        }
    if "big" in want:
        out["big"] = await big(args.big_mib)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", choices=SCENARIOS)
    p.add_argument("--big-mib", type=int, default=10240)
    args = p.parse_args()

    result, reporting = run_with_reporting_off(lambda: run(args))
    print(json.dumps({"benchmark": "scale", "host_page_reporting": reporting, **result}, indent=1))


if __name__ == "__main__":
    main()
