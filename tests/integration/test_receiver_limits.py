"""What idle connections can make a real receiver (``migrated recv``) hold: issue 9
finding 4 (about 330 KiB of RSS per idle connection, kept after it closed; no cap).

docs/protocol.md states the limits: at most ``max_pending_connections`` (32) connections
waiting for their Hello, each for at most the handshake deadline; beyond the cap a
connection is closed at once, before anything is read or allocated for it."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from .pair import Pair

pytestmark = [pytest.mark.uffd]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_idle(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
    return socks


def refused_and_closed(s: socket.socket) -> bool:
    """The receiver answered (an Error(busy) frame) and closed: EOF after the bytes."""
    s.setblocking(False)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except BlockingIOError:
        return False  # still open: waiting for its Hello
    except OSError:
        return True
    return bool(got)


def test_two_thousand_idle_connections_leave_the_receivers_memory_as_it_was(pair: Pair) -> None:
    dest = pair.start_dest()
    # Warm the receiver's allocator with a first wave, then measure.
    for s in open_idle(pair.dest_port, 200):
        s.close()
    time.sleep(0.5)
    before = rss_kib(dest.pid)

    socks = open_idle(pair.dest_port, 2000)
    time.sleep(1.0)  # the receiver accepts and refuses what exceeds its cap
    held = rss_kib(dest.pid)
    refused = sum(refused_and_closed(s) for s in socks)
    # At most the cap waits for a Hello; every other connection was told so (busy) and
    # closed at once.
    assert refused >= 2000 - 32, refused
    # 330 KiB a connection would be 640 MiB here; the cap bounds it to a few MiB.
    assert held - before < 16 * 1024, (before, held)

    for s in socks:
        s.close()
    time.sleep(1.0)
    after = rss_kib(dest.pid)
    assert after - before < 4 * 1024, (before, held, after)
    # And the receiver still takes a migration's connection: it answers a Hello
    # (here: garbage, refused with an Error frame rather than silence).
    with socket.create_connection(("127.0.0.1", pair.dest_port), timeout=10) as s:
        s.sendall(b"\x00" * 64)
        s.settimeout(10)
        assert s.recv(4096), "the receiver no longer answers after the idle flood"
    assert dest.alive(), pair.logs()
