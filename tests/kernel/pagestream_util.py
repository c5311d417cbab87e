"""Shared helpers of the page-loop tests: layouts, a stream generator, and a pure-Python
reference receiver that decodes with the protocol Connection alone."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hypothesis import strategies as st

from migrated.errors import ProtocolError
from migrated.kernel import PageBitmap, ProtocolHooks
from migrated.protocol import (
    MAX_HEADER_NBYTES,
    NEED_DATA,
    ChannelRole,
    ConnectionClosed,
    Error,
    MemoryLayout,
    Pages,
    Progress,
    ZeroPages,
)
from migrated.protocol.connection import Connection
from migrated.protocol.loopback import Loopback

PAGE = 4096
HOOKS = ProtocolHooks(Pages, ZeroPages, NEED_DATA, ConnectionClosed, MAX_HEADER_NBYTES)
MAX_FRAME = 6 * PAGE
SID = b"\x07" * 16


def opened(
    layout: MemoryLayout,
    checksum: str | None = None,
    channel: ChannelRole = ChannelRole.BULK,
    max_frame: int = MAX_FRAME,
) -> Loopback:
    """A source/destination pair of Connections after the handshake."""
    lb = Loopback(channel, layout=layout, max_frame_payload=max_frame)
    features = frozenset() if checksum is None else frozenset({f"checksum-{checksum}"})
    lb.handshake(SID, source_features=features, dest_features=features)
    return lb


def uint_wide(v: int) -> bytes:
    """A non-negative integer in a non-minimal msgpack encoding (still valid)."""
    if v < 1 << 63:
        return b"\xd3" + v.to_bytes(8, "big")  # int64
    return b"\xcf" + v.to_bytes(8, "big")


# --- stream items -----------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    kind: str
    args: tuple[Any, ...] = ()


def pattern(seed: int, nbytes: int) -> bytes:
    block = bytes((seed * 37 + i * 11) & 0xFF for i in range(256))
    return (block * (nbytes // 256 + 1))[:nbytes]


def encode(lb: Loopback, layout: MemoryLayout, item: Item, seed: int) -> bytes:
    """Bytes of one item as the source would write them (valid or not)."""
    src = lb.source
    k, a = item.kind, item.args
    if k == "pages":
        gpa, npages, rid = a
        data = pattern(seed, layout.range_nbytes(gpa, npages))
        return b"".join(bytes(b) for b in src.send(Pages(gpa, npages, memoryview(data), rid)))
    if k == "zero":
        gpa, npages, rid = a
        return b"".join(bytes(b) for b in src.send(ZeroPages(gpa, npages, rid)))
    if k == "pages_wide":  # valid, but integers not in the shortest form
        gpa, npages, rid = a
        hdr = b"\x95\x06" + uint_wide(gpa) + uint_wide(npages) + uint_wide(rid) + b"\xc0"
        return hdr + pattern(seed, layout.range_nbytes(gpa, npages))
    if k == "zero_wide":
        gpa, npages, rid = a
        return b"\x94\x07" + uint_wide(gpa) + uint_wide(npages) + uint_wide(rid)
    if k == "progress":
        return b"".join(bytes(b) for b in src.send(Progress(*a)))
    if k == "error":
        return b"".join(bytes(b) for b in src.send(Error("cancelled", a[0])))
    if k == "raw":  # any header, then payload bytes
        header, payload_len = a
        return msgpack.packb(header, use_bin_type=True) + pattern(seed, payload_len)
    if k == "garbage":
        return a[0]
    raise AssertionError(k)


def gpas(layout: MemoryLayout) -> st.SearchStrategy[tuple[int, int]]:
    """(gpa, npages) mostly inside a region, sometimes not."""
    inside = st.sampled_from(layout.regions).flatmap(
        lambda r: st.integers(0, r.npages - 1).flatmap(
            lambda i: st.tuples(
                st.just(r.gpa + i * r.page_size), st.integers(1, max(1, r.npages - i))
            )
        )
    )
    outside = st.tuples(
        st.sampled_from([1, 4095, 1 << 19, (1 << 20) - PAGE, 1 << 40, (1 << 64) - PAGE]),
        st.integers(1, 3),
    )
    return st.one_of(inside, inside, inside, inside, inside, outside)


def items(layout: MemoryLayout) -> st.SearchStrategy[Item]:
    rid = st.one_of(st.just(0), st.integers(0, (1 << 64) - 1))
    good = gpas(layout)
    raw_headers = st.one_of(
        st.tuples(good, rid, st.integers(0, (1 << 64) - 1)).map(
            lambda t: [6, t[0][0], t[0][1], t[1], t[2]]  # a checksum nobody negotiated
        ),
        st.tuples(good, st.integers(-3, 0)).map(lambda t: [7, t[0][0], t[1], 0]),
        st.tuples(good).map(lambda t: [6, t[0][0], t[0][1], 0]),  # one element short
        st.tuples(good).map(lambda t: [7, t[0][0], t[0][1], 0, None]),  # one too many
        st.tuples(good).map(lambda t: [6, -(t[0][0] % (1 << 63)) - 1, t[0][1], 0, None]),
        st.just([4, "vm", "uuid", [[0, PAGE, PAGE]], 1, "postcopy"]),  # Setup: not on BULK
        st.just([14, 1, 2]),  # Progress, fine
        st.just([99]),
        st.just({"a": 1}),
        st.just("text"),
    )
    fast = st.one_of(
        good.flatmap(lambda g: rid.map(lambda r: Item("pages", (*g, r)))),
        good.flatmap(lambda g: rid.map(lambda r: Item("zero", (*g, r)))),
    )
    return st.one_of(
        fast,
        fast,
        fast,
        fast,
        good.map(lambda g: Item("pages_wide", (*g, 3))),
        good.map(lambda g: Item("zero_wide", (*g, 0))),
        st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 20)).map(
            lambda t: Item("progress", t)
        ),
        st.text(max_size=8).map(lambda m: Item("error", (m,))),
        st.tuples(raw_headers, st.sampled_from([0, 0, 5, PAGE])).map(lambda t: Item("raw", t)),
        st.binary(min_size=1, max_size=12).map(lambda b: Item("garbage", (b,))),
    )


def build_stream(layout: MemoryLayout, its: Iterable[Item]) -> bytes:
    """Valid frames encode only where the layout allows (the source's Connection
    refuses others): such an item becomes its raw equivalent."""
    lb = opened(layout)
    out = bytearray()
    for seed, item in enumerate(its):
        if lb.source.error_sent:
            lb = opened(layout)  # a frame's bytes do not depend on what came before
        try:
            out += encode(lb, layout, item, seed)
        except ProtocolError:
            gpa, npages, r = item.args
            code = 6 if item.kind.startswith("pages") else 7
            hdr: list[Any] = [code, gpa, npages, r] + ([None] if code == 6 else [])
            out += msgpack.packb(hdr) + (pattern(seed, npages * PAGE) if code == 6 else b"")
    return bytes(out)


# --- the reference: the Connection alone, and a model of memory -------------------------


@dataclass
class Outcome:
    events: list[Any] = field(default_factory=list)
    error: tuple[str, str, str] | None = None  # (class, code, message)
    installed: list[tuple[int, int]] = field(default_factory=list)

    def record_error(self, exc: ProtocolError) -> None:
        self.error = (type(exc).__name__, exc.code, str(exc))


class Model:
    """Guest memory (one bytearray per region) and the received bitmap, for the
    reference.  Direct mode receives payloads in place, as the C loop does; with
    userfaultfd only pages whose bit is clear and that are not present are written."""

    def __init__(self, layout: MemoryLayout, direct: bool) -> None:
        self.layout = layout
        self.direct = direct
        self.mem = [bytearray(r.nbytes) for r in layout.regions]
        self.bits: set[int] = set()
        self.present: set[int] = set()  # installed by "someone else", bit clear
        self._staging = bytearray(MAX_FRAME)

    def _where(self, gpa: int) -> tuple[bytearray, int, int]:
        r = self.layout.region_of(gpa)
        return self.mem[self.layout.regions.index(r)], gpa - r.gpa, r.page_size

    def page(self, page: int) -> bytes:
        mem, off, ps = self._where(self.layout.gpa_of(page))
        return bytes(mem[off : off + ps])

    def set_page(self, page: int, content: bytes) -> None:
        mem, off, ps = self._where(self.layout.gpa_of(page))
        mem[off : off + ps] = content

    def sink(self, header: Any) -> memoryview | None:
        if type(header) is not Pages:
            return None
        mem, off, ps = self._where(header.gpa)
        nbytes = header.npages * ps
        if self.direct:
            return memoryview(mem)[off : off + nbytes]
        return memoryview(self._staging)[:nbytes]

    def install(self, gpa: int, npages: int, data: memoryview | None) -> None:
        first = self.layout.page_index(gpa)
        mem, off, ps = self._where(gpa)
        for k in range(npages):
            page = first + k
            if not self.direct and (page in self.bits or page in self.present):
                continue
            if data is None:
                mem[off + k * ps : off + (k + 1) * ps] = bytes(ps)
            elif not self.direct:
                mem[off + k * ps : off + (k + 1) * ps] = data[k * ps : (k + 1) * ps]
            self.bits.add(page)


def reference(
    layout: MemoryLayout, stream: bytes, chunks: list[int], model: Model, checksum: str | None
) -> Outcome:
    """Decode ``stream`` (fed in ``chunks``) with a Connection alone; install into model."""
    conn: Connection = opened(layout, checksum).dest
    conn.set_payload_sink(model.sink)
    out = Outcome()
    pos = 0
    sizes = [*chunks, len(stream)]
    try:
        for size in sizes:
            piece, pos = stream[pos : pos + max(1, size)], pos + max(1, size)
            conn.receive_data(piece if piece else b"")
            if not _drain(conn, model, out):
                return out
            if not piece:
                return out
        conn.receive_data(b"")
        _drain(conn, model, out)
    except ProtocolError as exc:
        out.record_error(exc)
    return out


def _drain(conn: Connection, model: Model, out: Outcome) -> bool:
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return True
        if type(ev) is Pages:
            model.install(ev.gpa, ev.npages, ev.data)
        elif type(ev) is ZeroPages:
            model.install(ev.gpa, ev.npages, None)
        else:
            out.events.append(ev)
            if type(ev) is ConnectionClosed:
                return False


def write_in_chunks(sock: socket.socket, stream: bytes, chunks: list[int]) -> threading.Thread:
    """A thread writing ``stream`` in pieces of ``chunks`` sizes (then the rest), then
    closing its end; stops quietly when the reader went away."""

    def run() -> None:
        pos = 0
        try:
            for size in [*chunks, len(stream)]:
                if pos >= len(stream):
                    break
                sock.sendall(stream[pos : pos + max(1, size)])
                pos += max(1, size)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def bitmap_set(bm: PageBitmap) -> set[int]:
    return {i for i in range(len(bm)) if bm[i]}
