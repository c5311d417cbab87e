"""The service tests' async tests run on both event loops: asyncio's and uvloop (the
one migrated's processes use)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


# -- real systemd hosts --------------------------------------------------------------------

import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import trustme  # noqa: E402

from tests.integration.pair import Netns  # noqa: E402

from .certs import write_tls_dir  # noqa: E402
from .sdhost import Host, systemd_usable  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("systemd"):
        reason = systemd_usable()
        if reason:
            pytest.skip(f"no namespaced systemd here: {reason}")


@pytest.fixture(scope="session")
def wheels() -> Iterator[Path]:
    """The wheel an operator would pip install, built once from this checkout."""
    d = Path(tempfile.mkdtemp(prefix="migrated-wheel-"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(d), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class Cluster:
    """Two installed hosts, ``a`` (10.77.0.1) and ``b`` (10.77.0.2), each with a
    certificate signed by one CA and allowed by the other; ``ca`` can sign more."""

    a: Host
    b: Host
    net: Netns
    ca: trustme.CA
    workdir: Path

    def tls_files(self, *names: str, ca: trustme.CA | None = None) -> dict[str, bytes]:
        d = write_tls_dir(self.workdir / "tls" / names[0], ca or self.ca, *names, trust=self.ca)
        return {p.name: p.read_bytes() for p in d.iterdir()}


HOST_CONFIG = """\
[daemon]
listen = "{ip}:7440"
log_level = "info"
incoming_address = "{ip}"
incoming_ports = "49152-49160"

[tls]
allowed_peers = ["{peer}"]

[metrics]
listen = "{ip}:9440"
"""

TEST_DROPIN = """\
[Service]
WatchdogSec=2s
TimeoutStopSec=5s
"""


@pytest.fixture(scope="module")
def cluster(wheels: Path) -> Iterator[Cluster]:
    reason = systemd_usable()
    if reason:
        pytest.skip(f"no namespaced systemd here: {reason}")
    workdir = Path(tempfile.mkdtemp(prefix="migrated-sd-"))
    net = Netns()
    hosts: list[Host] = []
    ok = False
    try:
        net.create()
        ca = trustme.CA()
        cl = Cluster(
            Host(workdir, "host-a", net.src_ns, wheels),
            Host(workdir, "host-b", net.dst_ns, wheels),
            net, ca, workdir,
        )  # fmt: skip
        for host, ip, peer in ((cl.a, net.src_ip, "host-b"), (cl.b, net.dst_ip, "host-a")):
            host.boot()
            hosts.append(host)
            host.ip = ip  # type: ignore[attr-defined]
            host.install()
            for name, data in cl.tls_files(host.name, ip).items():
                host.put(f"/etc/migrated/tls/{name}", data, 0o600 if "key" in name else 0o644)
            host.put("/etc/migrated/migrated.toml", HOST_CONFIG.format(ip=ip, peer=peer))
            # A short watchdog for the test (the shipped unit says 10 s).
            host.put("/run/systemd/system/migrated.service.d/watchdog.conf", TEST_DROPIN)
            host.systemctl("daemon-reload")
        ok = True
        yield cl
    finally:
        for h in hosts:
            h.close()
        net.delete()
        if ok or os.environ.get("MIGRATED_KEEP_WORKDIR") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"\nsystemd host logs kept in {workdir}")
