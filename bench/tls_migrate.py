"""What mutual TLS costs a whole migration: the same VM migrated between two VM unit
processes (``migrated vm NAME``, as systemd runs them) over plain TCP and over mutual
TLS 1.3, alternately, in one run.  Prints one JSON object; never asserts.

    .venv/bin/python bench/tls_migrate.py --memory-mib 1024 --runs 2

Each side gets its own host configuration (``[tls] mode = "plain"`` or ``"mtls"`` with a
trustme CA in QEMU's file layout and default-deny ``allowed_peers``) and its own runtime
and state directories under a temporary directory; the daemons are not involved (they
only start these processes and pass the address).  Every migrated guest is verified on
arrival.  Free page reporting is off for the run, as in ``bench/migrate.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hostprep import run_with_reporting_off, warm_host_memory
from migrated.demo import CONFIG, stop_process
from migrated.errors import MigratedError
from migrated.service.control import request, stream
from tests.service.certs import write_tls_dir

HOST_CONFIG = """\
[daemon]
vm_dir = "{root}/vms"
state_dir = "{root}/state"
runtime_dir = "{root}/run"

[tls]
mode = "{mode}"
dir = "{root}/tls"
allowed_peers = ["{peer}"]
"""


def host(root: Path, mode: str, me: str, peer: str, ca: trustme.CA) -> Path:
    for sub in ("vms", "state", "run/vm/web"):  # systemd's RuntimeDirectory= makes the last
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_tls_dir(root / "tls", ca, me, "127.0.0.1")
    cfg = root / "migrated.toml"
    cfg.write_text(HOST_CONFIG.format(root=root, mode=mode, peer=peer))
    return cfg


async def wait_status(sock: str, proc: subprocess.Popen[bytes], key: str) -> dict[str, Any]:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = Path(sock).parents[3] / "process.log"
            raise RuntimeError(
                f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
            )
        try:
            st = await request(sock, "status")
        except (OSError, ValueError, MigratedError):
            st = {}  # not listening yet
        if key == "ready":
            vcpus = (st.get("vm") or {}).get("vcpus") or []
            if vcpus and all((v["last_report"] or "").startswith("ready") for v in vcpus):
                return st
        elif st.get(key):
            return st
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{sock}: no {key}")


async def migrate_once(work: Path, mode: str, memory_mib: int) -> dict[str, Any]:
    ca = trustme.CA()
    a = host(work / "a", mode, "host-a", "host-b", ca)
    b = host(work / "b", mode, "host-b", "host-a", ca)
    (work / "a" / "vms" / "web.toml").write_text(
        CONFIG.format(name="web", memory_mib=memory_mib, vcpus=1, guest="memstress",
                      hot_set_mib=64, writes_per_s=20000, fill_percent=100, seed=1, extra="")
    )  # fmt: skip
    cmd = [sys.executable, "-m", "migrated", "vm", "web"]
    logs = [open(work / s / "process.log", "wb") for s in ("a", "b")]  # noqa: SIM115
    src = subprocess.Popen([*cmd, "--config", str(a)], stdout=logs[0], stderr=logs[0])
    dst = subprocess.Popen(
        [*cmd, "--config", str(b), "--incoming", "127.0.0.1:0"], stdout=logs[1], stderr=logs[1]
    )
    src_sock = str(work / "a" / "run" / "vm" / "web" / "control.sock")
    dst_sock = str(work / "b" / "run" / "vm" / "web" / "control.sock")
    try:
        port = (await wait_status(dst_sock, dst, "port"))["port"]
        await wait_status(src_sock, src, "ready")
        warm_host_memory((memory_mib << 20) + (256 << 20))
        result: dict[str, Any] = {}
        async for msg in stream(src_sock, "migrate", to=f"127.0.0.1:{port}", mode="postcopy"):
            if "result" in msg:
                result = msg["result"]
            elif "error" in msg and "event" not in msg:
                raise RuntimeError(f"{mode}: migration failed: {msg['error']}")
        verify = await request(dst_sock, "verify", timeout_s=600)
        stats = result.get("stats") or {}
        lat = ((await request(dst_sock, "status")).get("migration") or {}).get("fault_latency", {})
        return {
            "status": result.get("status"),
            "total_s": stats.get("total_s"),
            "GB_per_s": round((memory_mib << 20) / stats["total_s"] / 1e9, 3)
            if stats.get("total_s")
            else None,
            "downtime_ms": round((stats.get("downtime_s") or 0) * 1e3, 2),
            "fault_p50_us": lat.get("p50_us"),
            "fault_p99_us": lat.get("p99_us"),
            "push_channel": stats.get("push_channel"),
            "verify_ok": bool(verify.get("ok")),
        }
    finally:
        for p in (src, dst):
            stop_process(p, 15)
        for f in logs:
            f.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, list[dict[str, Any]]] = {"plain": [], "mtls": []}
    for _ in range(args.runs):
        for mode in ("plain", "mtls"):
            with tempfile.TemporaryDirectory(prefix=f"migrated-tlsbench-{mode}-") as d:
                out[mode].append(await migrate_once(Path(d), mode, args.memory_mib))
    median = {}
    for mode, runs in out.items():
        times = sorted(r["total_s"] for r in runs if r["total_s"])
        median[mode] = times[len(times) // 2] if times else None
    return {
        "runs": out,
        "median_total_s": median,
        "mtls_over_plain_total": round(median["mtls"] / median["plain"], 3)
        if median["mtls"] and median["plain"]
        else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory-mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    result, reporting = run_with_reporting_off(lambda: run(args))
    print(json.dumps({"benchmark": "tls_migrate", "config": vars(args),
                      "host_page_reporting": reporting, **result}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
