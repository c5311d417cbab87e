"""Benchmark one migration on loopback and print a JSON object.

    .venv/bin/python bench/migrate.py --memory-mib 4096 --mode postcopy

Runs a real source VM process and a real receiver process (as `migrated demo`
does), migrates, verifies the guest on the destination, and reports both sides'
statistics, the targets of the migration issue, the memory migrated used beyond
guest RAM (peak RSS minus guest RAM), the CPU seconds each thread of both processes
used during the migration (``thread_cpu_s``), and, measured in the same run, this machine's
loopback TCP throughput and the physical reference of ``bench/floor.py`` (C: loopback
TCP into userfaultfd-registered memory, one UFFDIO_COPY per MiB) with migrated's
fraction of it.  Not a test: no assertions.

About this sandbox's free page reporting see ``bench/hostprep.py``: by default
(``--host-warmup``) the benchmark turns reporting off for its run, touches as much
memory as the destination will allocate so those pages are backed, and restores the
setting afterwards.  Use ``--no-host-warmup`` for the as-is figure; the output says
which was measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.floor import physical_reference
from bench.hostprep import disable_page_reporting, restore_page_reporting, warm_host_memory
from migrated.demo import LocalPair

CHUNK = 1 << 20


def _sink(port_q: Any, nbytes: int) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = memoryview(bytearray(CHUNK))
    got = 0
    while got < nbytes:
        n = conn.recv_into(buf)
        if not n:
            break
        got += n
    conn.close()


def loopback_tcp_bytes_per_s(nbytes: int = 2 << 30) -> float:
    """Python sockets, 1 MiB writes, two processes: the pipe's ceiling here."""
    q: Any = multiprocessing.Queue()
    p = multiprocessing.Process(target=_sink, args=(q, nbytes))
    p.start()
    port = q.get()
    s = socket.create_connection(("127.0.0.1", port))
    data = memoryview(bytearray(b"\x5a" * CHUNK))
    t = time.perf_counter()
    sent = 0
    while sent < nbytes:
        s.sendall(data)
        sent += CHUNK
    s.shutdown(socket.SHUT_WR)
    p.join()
    return nbytes / (time.perf_counter() - t)


class ThreadCpu:
    """CPU seconds per thread name of some processes, sampled every 20 ms from
    /proc/PID/task/*/stat (a process that exits keeps its last sample).  Threads are
    named for the kernel by migrated (``vcpuN/VM``, ``migrated-push``, ...); the event
    loop is the process's main thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")
        self.first: dict[tuple[str, int], tuple[str, int]] = {}
        self.last: dict[tuple[str, int], tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for side, pid in self.pids.items():
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                except OSError:
                    continue
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                if int(tid) == pid:
                    name = "main (event loop)"
                fields = stat[stat.rindex(")") + 2 :].split()
                ticks = int(fields[11]) + int(fields[12])  # utime + stime
                self.first.setdefault((side, int(tid)), (name, ticks))
                self.last[(side, int(tid))] = (name, ticks)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> ThreadCpu:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def seconds(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {side: {} for side in self.pids}
        for key, (name, ticks) in self.last.items():
            side = key[0]
            used = (ticks - self.first[key][1]) / self.tick
            out[side][name] = round(out[side].get(name, 0.0) + used, 3)
        return {
            side: dict(sorted(((k, v) for k, v in names.items() if v > 0), key=lambda kv: -kv[1]))
            for side, names in out.items()
        }


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def migrate_once(args: argparse.Namespace) -> dict[str, Any]:
    pair = LocalPair(
        memory_mib=args.memory_mib,
        vcpus=args.vcpus,
        hot_set_mib=args.hot_set_mib,
        writes_per_s=args.writes_per_s,
    )
    try:
        t = time.monotonic()
        await pair.start(timeout_s=600)
        boot_s = time.monotonic() - t
        assert pair.source is not None and pair.dest is not None
        src_pid, dst_pid = pair.source.pid, pair.dest.pid
        src_rss_before = peak_rss_bytes(src_pid)
        warmup_s = None
        if args.host_warmup:
            warmup_s = round(warm_host_memory((args.memory_mib << 20) + (256 << 20)), 2)
        with ThreadCpu({"source": src_pid, "destination": dst_pid}) as cpu:
            result = await pair.migrate(
                args.mode,
                max_precopy_rounds=args.max_precopy_rounds,
                checksum=args.checksum,
                frame_pages=args.frame_pages,
            )
        dst_rss = peak_rss_bytes(dst_pid)
        verify = await pair.verify_dest(timeout_s=300)
        dst = (await pair.dest_status()).get("migration") or {}
        return {
            "boot_s": round(boot_s, 2),
            "host_warmup_s": warmup_s,
            "source": result.get("stats", {}),
            "destination": dst,
            "verify_ok": bool(verify.get("ok")),
            "verify": verify.get("reports"),
            "thread_cpu_s": cpu.seconds(),
            "source_peak_rss_bytes": src_rss_before,
            "dest_peak_rss_bytes": dst_rss,
        }
    finally:
        pair.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory-mib", type=int, default=4096)
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--hot-set-mib", type=int, default=64)
    p.add_argument("--writes-per-s", type=int, default=20000)
    p.add_argument("--mode", choices=["postcopy", "hybrid", "precopy"], default="postcopy")
    p.add_argument("--max-precopy-rounds", type=int, default=5)
    p.add_argument("--checksum", action="store_true")
    p.add_argument("--frame-pages", type=int, default=None, help="pages per bulk frame")
    p.add_argument("--no-loopback-reference", action="store_true")
    p.add_argument("--no-physical-reference", action="store_true")
    p.add_argument(
        "--host-warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="turn this sandbox's free page reporting off for the run and warm "
        "the destination's memory (see the module docstring)",
    )
    args = p.parse_args()

    import uvloop

    old_order = disable_page_reporting() if args.host_warmup else None
    try:
        run = uvloop.run(migrate_once(args))
    finally:
        restore_page_reporting(old_order)
    ram = args.memory_mib << 20
    src, dst = run["source"], run["destination"]
    lat = dst.get("fault_latency", {})
    total_s = src.get("total_s") or float("nan")
    gib = ram / (1 << 30)
    overhead_budget = (64 << 20) + int(gib * (1 << 20))
    dst_overhead = run["dest_peak_rss_bytes"] - ram
    out: dict[str, Any] = {
        "benchmark": "migrate",
        "host_page_reporting": (
            f"off for the run (was order {old_order}), memory warmed"
            if old_order is not None
            else "as the host has it"
        ),
        "config": vars(args),
        "effective_bytes_per_s": round(ram / total_s),
        "effective_GB_per_s": round(ram / total_s / 1e9, 3),
        "total_s": total_s,
        "downtime_ms": round(src.get("downtime_s", 0) * 1e3, 2),
        "fault_latency_us": {
            k: lat.get(k) for k in ("count", "p50_us", "p90_us", "p99_us", "max_us")
        },
        "dest_memory_overhead_bytes": dst_overhead,
        # CPU seconds each thread used during the migration (this host has
        # os.cpu_count() CPUs for all of them together)
        "thread_cpu_s": run["thread_cpu_s"],
        "cpus": os.cpu_count(),
        "verify_ok": run["verify_ok"],
        "targets": {
            "effective_GB_per_s>=3": ram / total_s >= 3e9,
            "fault_p50_us<=50": (lat.get("p50_us") or 1e9) <= 50,
            "fault_p99_us<=500": (lat.get("p99_us") or 1e9) <= 500,
            "downtime_ms<=5": src.get("downtime_s", 1) * 1e3 <= 5,
            "dest_overhead<=64MiB+1MiB/GiB": dst_overhead <= overhead_budget,
        },
        "run": run,
    }
    if not args.no_loopback_reference:
        ref = loopback_tcp_bytes_per_s()
        out["loopback_tcp_GB_per_s"] = round(ref / 1e9, 3)
        out["fraction_of_loopback"] = round(ram / total_s / ref, 3)
    if not args.no_physical_reference:
        # The floor of a postcopy push here, in C: loopback TCP from a second process
        # into userfaultfd-registered memory, one UFFDIO_COPY per MiB (bench/floor.py).
        old_order = disable_page_reporting() if args.host_warmup else None
        try:
            floor = physical_reference(min(ram, 2 << 30), 1 << 20, 2, args.host_warmup)
        finally:
            restore_page_reporting(old_order)
        out["physical_reference"] = {k: v for k, v in floor.items() if k != "runs"}
        out["fraction_of_physical_reference"] = round(
            ram / total_s / (floor["install_GB_per_s"] * 1e9), 3
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
