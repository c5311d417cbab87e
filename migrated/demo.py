"""``migrated demo``: a real migration between two local VM processes.

Starts a memstress VM (``migrated run``) and an empty receiver (``migrated recv``) as
separate processes with their own control sockets, migrates the VM over loopback TCP
while it keeps writing, asks the guest on the destination to verify every page, and
prints a summary.  Also the engine of ``bench/migrate.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrated.errors import MigratedError
from migrated.service.control import request, stream
from migrated.ui import Printer

__all__ = ["LocalPair", "run_demo", "stop_process"]

CONFIG = """\
name = "{name}"
memory_mib = {memory_mib}
vcpus = {vcpus}
console = "none"

[guest]
builtin = "{guest}"
hot_set_mib = {hot_set_mib}
writes_per_s = {writes_per_s}
fill_percent = {fill_percent}
seed = {seed}
{extra}"""


def _migrated(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrated", *args]


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s`` (a VM split by postcopy ignores
    SIGTERM on purpose); reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class LocalPair:
    """A source VM process and a receiver process on this machine."""

    memory_mib: int = 512
    vcpus: int = 2
    guest: str = "memstress"
    hot_set_mib: int = 64
    writes_per_s: int = 20000
    fill_percent: int = 100
    listen: str = "127.0.0.1:0"
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="migrated-")))
    source: subprocess.Popen[bytes] | None = None
    dest: subprocess.Popen[bytes] | None = None
    dest_port: int = 0

    @property
    def src_sock(self) -> str:
        return str(self.workdir / "source.sock")

    @property
    def dst_sock(self) -> str:
        return str(self.workdir / "dest.sock")

    async def start(self, timeout_s: float = 60.0) -> None:
        cfg = self.workdir / "vm.toml"
        cfg.write_text(
            CONFIG.format(
                name="demo",
                memory_mib=self.memory_mib,
                vcpus=self.vcpus,
                guest=self.guest,
                hot_set_mib=self.hot_set_mib,
                writes_per_s=self.writes_per_s,
                fill_percent=self.fill_percent,
                seed=1,
                extra="",
            )
        )
        log = open(self.workdir / "source.log", "wb")  # noqa: SIM115 - owned by the process
        self.source = subprocess.Popen(
            _migrated("run", str(cfg), "--control", self.src_sock, "--json"), stdout=log, stderr=log
        )
        log = open(self.workdir / "dest.log", "wb")  # noqa: SIM115
        self.dest = subprocess.Popen(
            _migrated("recv", "--listen", self.listen, "--control", self.dst_sock, "--json"),
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + timeout_s
        await self._wait_ready(deadline)
        while True:
            st = await self._status(self.dst_sock, deadline)
            if st.get("port"):
                self.dest_port = int(st["port"])
                break
            await asyncio.sleep(0.05)

    async def _status(self, sock: str, deadline: float) -> dict[str, Any]:
        while True:
            for proc, name in ((self.source, "source"), (self.dest, "destination")):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"the {name} process exited with {proc.returncode}; "
                        f"see {self.workdir}/{name.replace('destination', 'dest')}.log"
                    )
            try:
                return await request(sock, "status")
            except MigratedError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _wait_ready(self, deadline: float) -> None:
        while True:
            st = await self._status(self.src_sock, deadline)
            vcpus = st["vm"].get("vcpus", [])
            if vcpus and all(
                (v["last_report"] or "").startswith(("ready", "verify")) for v in vcpus
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the source guest did not report ready in time")
            await asyncio.sleep(0.1)

    async def migrate(
        self, mode: str = "hybrid", on_event: Any = None, **params: Any
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        async for msg in stream(
            self.src_sock, "migrate", to=f"127.0.0.1:{self.dest_port}", mode=mode, **params
        ):
            if "result" in msg:
                result = msg["result"]
            elif on_event is not None:
                on_event(msg)
        return result

    async def dest_status(self) -> dict[str, Any]:
        return await request(self.dst_sock, "status")

    async def verify_dest(self, timeout_s: float = 120.0) -> dict[str, Any]:
        return await request(self.dst_sock, "verify", timeout_s=timeout_s)

    def stop(self) -> None:
        for proc in (self.source, self.dest):
            if proc is not None:
                stop_process(proc)
        for sock in (self.src_sock, self.dst_sock):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)


def _summary(
    mode: str, pair: LocalPair, src: dict[str, Any], dst: dict[str, Any], verify: dict[str, Any]
) -> list[str]:
    lat = dst.get("fault_latency", {})
    ram = src.get("ram_bytes", 0)
    rounds = src.get("dirty_pages_per_round", [])

    def us(v: Any) -> str:
        return "-" if v is None else f"{v:.0f} µs"

    return [
        f"migrated demo: {pair.memory_mib} MiB memstress VM, {pair.vcpus} vCPUs, mode {mode}",
        f"  total time       {src.get('total_s', 0):.3f} s",
        f"  downtime         {src.get('downtime_s', 0) * 1e3:.1f} ms (source pause → "
        "destination running)",
        f"  throughput       {ram / max(src.get('total_s', 1e-9), 1e-9) / 1e9:.2f} GB/s "
        f"(guest RAM / total time), {src.get('transferred_bytes', 0) / 2**20:.0f} MiB sent",
        f"  precopy rounds   {src.get('precopy_rounds', 0)}"
        + (f" (dirty pages after each: {', '.join(map(str, rounds))})" if rounds else ""),
        f"  zero pages       {src.get('zero_pages', 0)} sent as zero runs; "
        f"{src.get('discarded_pages', 0)} pages discarded at switchover",
        f"  page faults      {dst.get('postcopy_requests', 0)} served on the destination; "
        f"latency p50 {us(lat.get('p50_us'))}, p99 {us(lat.get('p99_us'))}",
        f"  pre-fault        {dst.get('prefault', {}).get('reason') or dst.get('prefault')}",
        f"  guest verify     {'OK' if verify.get('ok') else 'FAILED'}: "
        + "; ".join(verify.get("reports", [])),
    ]


def run_demo(
    *, memory_mib: int = 512, vcpus: int = 2, mode: str = "hybrid", as_json: bool = False
) -> int:
    printer = Printer(as_json)
    pair = LocalPair(memory_mib=memory_mib, vcpus=vcpus)

    async def go() -> int:
        try:
            print(
                f"migrated demo: starting a {memory_mib} MiB memstress VM and a receiver "
                f"(work dir {pair.workdir})",
                file=sys.stderr,
            )
            await pair.start()
            result = await pair.migrate(mode, on_event=printer)
            verify = await pair.verify_dest()
            dst = (await pair.dest_status()).get("migration") or {}
            src = result.get("stats", {})
            if as_json:
                print(
                    json.dumps(
                        {"event": "summary", "source": src, "destination": dst, "verify": verify}
                    )
                )
            else:
                print("\n".join(_summary(mode, pair, src, dst, verify)))
            return 0 if verify.get("ok") else 1
        finally:
            pair.stop()

    import uvloop

    return uvloop.run(go())
