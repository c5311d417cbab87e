"""The asyncio glue, fed the way libuv feeds a BufferedProtocol: get_buffer, then
buffer_updated, at arbitrary read boundaries (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from migrated.protocol import MemoryLayout, MemoryRegion, Pages, Setup, VmState
from migrated.protocol.loopback import Loopback
from migrated.transport.channel import Channel
from migrated.transport.security import Security

LAYOUT = MemoryLayout((MemoryRegion(0, 64 * 4096, 4096),))
SID = b"s" * 16
PLAIN = Security.plain()


def wire_bytes() -> tuple[Loopback, bytes, list[Any]]:
    """A handshaken pair (checksums negotiated) and the source's frames as bytes."""
    lb = Loopback(layout=LAYOUT)
    lb.handshake(SID)
    events = [
        Setup("vm", "u", LAYOUT, 1, "postcopy"),
        Pages(0, 2, memoryview(bytes(range(256)) * 32)),
        VmState(memoryview(b"state" * 3000)),
        Pages(4096 * 8, 1, memoryview(b"\x07" * 4096)),
    ]
    out = b"".join(bytes(b) for e in events for b in lb.source.send(e))
    return lb, out, events


def feed(ch: Channel, data: bytes, read_nbytes: int) -> None:
    """Deliver ``data`` like libuv: ask for a buffer, fill up to its size, report."""
    pos = 0
    while pos < len(data):
        buf = ch.get_buffer(-1)
        n = min(len(buf), read_nbytes, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        ch.buffer_updated(n)
        pos += n


@pytest.mark.timeout(20)  # the bug this guards against was an endless loop
async def test_reads_at_every_boundary_with_sink_and_unsinked_payloads() -> None:
    # Every read size, including ones that end a read exactly after the VmState
    # header: that used to spin forever in get_buffer.
    for read_nbytes in (1, 7, 64, 1000, 4096, 8191, 20000, 10**6):
        lb, data, sent = wire_bytes()
        conn = lb.dest
        sinks: list[memoryview] = []

        def sink(header: Any, sinks: list[memoryview] = sinks) -> memoryview | None:
            if isinstance(header, Pages):
                sinks.append(memoryview(bytearray(header.npages * 4096)))
                return sinks[-1]
            return None

        conn.set_payload_sink(sink)
        got: list[Any] = []
        ch = Channel(
            conn, name="main", on_event=lambda _c, e, got=got: got.append(e), security=PLAIN
        )
        feed(ch, data, read_nbytes)
        assert not ch.closed.done(), ch.closed.exception()
        assert [type(e) for e in got] == [type(e) for e in sent]
        assert bytes(got[1].data) == bytes(sent[1].data)
        assert bytes(got[2].data) == bytes(sent[2].data)
        assert bytes(got[3].data) == bytes(sent[3].data)
    await asyncio.sleep(0)


class RecordingTransport:
    """Just enough of asyncio.Transport to see what a Channel writes and closes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def writelines(self, bufs: list[Any]) -> None:
        self.written.extend(bytes(b) for b in bufs)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_a_protocol_violation_is_named_to_the_peer() -> None:
    from migrated.errors import RemoteProtocolError
    from migrated.protocol import Error

    lb, _, _ = wire_bytes()
    ch = Channel(lb.dest, name="main", on_event=lambda _c, e: None, security=PLAIN)
    transport = RecordingTransport()
    ch.transport = transport  # type: ignore[assignment]
    feed(ch, b"\xc1" * 64, 64)  # 0xc1 is never valid msgpack
    assert isinstance(ch.closed.exception(), RemoteProtocolError)
    assert transport.closed
    lb.source.receive_data(b"".join(transport.written))
    err = lb.source.next_event()
    assert isinstance(err, Error) and err.code == "bad-frame"


async def test_detach_inside_a_callback_leaves_the_rest_to_the_new_owner() -> None:
    import socket

    lb, data, sent = wire_bytes()
    a, b = socket.socketpair()
    transport = RecordingTransport()
    transport.get_extra_info = lambda name: a if name == "socket" else None  # type: ignore[attr-defined]
    got: list[Any] = []
    fds: list[int] = []

    def first_then_detach(_c: Channel, e: Any) -> None:
        got.append(e)
        fds.append(ch.detach())

    ch = Channel(lb.dest, name="bulk", on_event=first_then_detach, security=PLAIN)
    ch.transport = transport  # type: ignore[assignment]
    feed_once = ch.get_buffer(-1)
    n = min(len(feed_once), len(data))
    feed_once[:n] = data[:n]
    ch.buffer_updated(n)  # every frame is buffered; the callback detaches on the first
    assert [type(e) for e in got] == [type(sent[0])]
    assert transport.closed
    # The channel stopped decoding: the next frame is still there for the new owner.
    lb.dest.receive_data(data[n:])
    assert type(lb.dest.next_event()) is type(sent[1])
    import os

    os.close(fds[0])
    a.close()
    b.close()
