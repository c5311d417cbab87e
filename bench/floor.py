"""The physical reference: loopback TCP from a second process into registered memory.

    .venv/bin/python bench/floor.py [--gib 2] [--chunk-kib 1024] [--repeat 3]

Compiles ``bench/floor.c`` (gcc), then, with this sandbox's free page reporting off
and memory warmed (``bench/hostprep.py``), moves ``--gib`` over 127.0.0.1 from a
sender process to a receiver process that

* ``install``: receives into a cache-hot staging buffer and installs each chunk with
  one UFFDIO_COPY into userfaultfd-registered memory (the floor of a postcopy push);
* ``recv``: only receives (the loopback TCP ceiling);
* ``hugetlb`` (with ``--hugetlb``): as ``install``, into 2 MiB hugetlbfs pages, one
  UFFDIO_COPY per 2 MiB chunk (vm.nr_hugepages is raised for the run and restored;
  one unrecorded run first backs the pool, as a host does once at boot).

Prints one JSON object: every run, and the best of each mode.  Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.hostprep import (
    describe,
    disable_page_reporting,
    load_1m,
    restore_page_reporting,
    warm_host_memory,
)

HERE = Path(__file__).resolve().parent


def build(workdir: str) -> str:
    exe = os.path.join(workdir, "floor")
    subprocess.run(["gcc", "-O2", "-o", exe, str(HERE / "floor.c")], check=True)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_once(exe: str, nbytes: int, chunk: int, mode: str, warm: bool) -> dict[str, Any]:
    if warm:
        warm_host_memory(nbytes + (256 << 20))
    port = free_port()
    rx = subprocess.Popen(
        [exe, "recv", str(port), str(nbytes), str(chunk), mode], stdout=subprocess.PIPE, text=True
    )
    assert rx.stdout is not None
    try:
        assert rx.stdout.readline().strip() == "listening"
        load = load_1m()
        subprocess.run([exe, "send", str(port), str(nbytes), str(chunk)], check=True)
        out = json.loads(rx.stdout.readline())
        rx.wait(60)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    out["loadavg_1m_before"] = round(load, 2)
    return out


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def physical_reference(
    nbytes: int = 2 << 30,
    chunk: int = 1 << 20,
    repeat: int = 3,
    warm: bool = True,
    hugetlb: bool = False,
) -> dict[str, Any]:
    """Runs each mode ``repeat`` times; returns every run and the best of each.
    The caller handles page reporting (see :mod:`bench.hostprep`)."""
    modes = ["install", "recv"] + (["hugetlb"] if hugetlb else [])
    old_nr = NR_HUGEPAGES.read_text().strip()
    with tempfile.TemporaryDirectory(prefix="migrated-floor-") as d:
        exe = build(d)
        runs = []
        try:
            if hugetlb:
                # Reserve the pool once and touch it with one run that is not kept: a
                # host reserves and backs its huge pages at boot, not per migration.
                NR_HUGEPAGES.write_text(str(int(old_nr) + (nbytes >> 21)))
                run_once(exe, nbytes, max(chunk, 2 << 20), "hugetlb", warm)
            for _ in range(repeat):
                for mode in modes:
                    size = max(chunk, 2 << 20) if mode == "hugetlb" else chunk
                    runs.append(run_once(exe, nbytes, size, mode, warm))
        finally:
            NR_HUGEPAGES.write_text(old_nr)
    best = {
        mode: max((r for r in runs if r["mode"] == mode), key=lambda r: r["GB_per_s"])
        for mode in modes
    }
    gib = nbytes / (1 << 30)
    out: dict[str, Any] = {
        "install_GB_per_s": best["install"]["GB_per_s"],
        "recv_only_GB_per_s": best["recv"]["GB_per_s"],
        "install_s_per_GiB": round(best["install"]["install_s"] / gib, 4),
        "recv_s_per_GiB": round(best["install"]["recv_s"] / gib, 4),
    }
    if hugetlb:
        out["hugetlb_GB_per_s"] = best["hugetlb"]["GB_per_s"]
        out["hugetlb_install_s_per_GiB"] = round(best["hugetlb"]["install_s"] / gib, 4)
    out["runs"] = runs
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--chunk-kib", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--host-warmup", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--hugetlb", action="store_true", help="also measure hugetlbfs pages")
    args = p.parse_args()
    old = disable_page_reporting() if args.host_warmup else None
    try:
        ref = physical_reference(
            int(args.gib * (1 << 30)),
            args.chunk_kib << 10,
            args.repeat,
            args.host_warmup,
            args.hugetlb,
        )
    finally:
        restore_page_reporting(old)
    out = {"benchmark": "physical-reference", "host_page_reporting": describe(old), **ref}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
