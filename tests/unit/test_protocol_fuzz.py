"""The fuzz invariant: any byte stream yields valid events or RemoteProtocolError.

Never another exception, never a page event outside the layout, never a payload whose
size disagrees with its header.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrated.errors import RemoteProtocolError
from migrated.protocol import (
    NEED_DATA,
    ChannelRole,
    Connection,
    ConnectionClosed,
    Discard,
    MemoryLayout,
    MemoryRegion,
    PageRequest,
    Pages,
    PrecopyRoundEnd,
    Progress,
    Role,
    Switchover,
    VmState,
    ZeroPages,
)
from migrated.protocol.loopback import Loopback

PAGE = 4096
LAYOUT = MemoryLayout((MemoryRegion(0, 8 * PAGE, PAGE), MemoryRegion(1 << 20, 4 * PAGE, PAGE)))
SID = b"F" * 16
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def opened(checksum: str | None) -> Loopback:
    lb = Loopback(layout=LAYOUT)
    features = frozenset() if checksum is None else frozenset({f"checksum-{checksum}"})
    lb.handshake(SID, source_features=features, dest_features=features)
    return lb


def check_event(event: Any) -> None:
    if type(event) is Pages:
        nbytes = LAYOUT.range_nbytes(event.gpa, event.npages)  # raises if outside
        assert event.data is not None and event.data.nbytes == nbytes
    elif type(event) in (ZeroPages, Discard, PageRequest):
        LAYOUT.check_range(event.gpa, event.npages)
    elif type(event) is VmState:
        assert event.data is not None


def consume(conn: Connection, chunks: list[bytes], sink: bool = False) -> list[Any]:
    """Feed chunks; return events.  Only RemoteProtocolError may escape (and ends it)."""
    if sink:
        memory = bytearray(LAYOUT.regions[-1].end_gpa)
        conn.set_payload_sink(
            lambda h: (
                memoryview(memory)[h.gpa : h.gpa + h.npages * PAGE] if type(h) is Pages else None
            )
        )
    events: list[Any] = []
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if type(event) is ConnectionClosed:
                    return events
                check_event(event)
                events.append(event)
    except RemoteProtocolError:
        pass
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@FUZZ
@given(
    raw=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=5),
    checksum=st.sampled_from([None, "xxh3", "crc32"]),
    open_first=st.booleans(),
    role=st.sampled_from(list(Role)),
)
def test_arbitrary_bytes(
    raw: bytes, cuts: list[int], checksum: str | None, open_first: bool, role: Role
) -> None:
    if open_first:
        lb = opened(checksum)
        conn = lb.dest if role is Role.DESTINATION else lb.source
    else:
        conn = Connection(role, ChannelRole.MAIN, layout=LAYOUT)
    consume(conn, split(raw, cuts))


ranges = st.builds(
    lambda region, first, n: (region, first, n),
    st.integers(0, 1),
    st.integers(0, 8),
    st.integers(1, 9),
)


def _range(spec: tuple[int, int, int]) -> tuple[int, int] | None:
    region_index, first, npages = spec
    region = LAYOUT.regions[region_index]
    if first + npages > region.npages:
        return None
    return region.gpa + first * PAGE, npages


@st.composite
def source_frames(draw: st.DrawFn) -> list[Any]:
    out: list[Any] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["pages", "zero", "discard", "progress", "round", "vm"]))
        rng = _range(draw(ranges)) or (0, 1)
        if kind == "pages":
            fill = draw(st.integers(0, 255))
            out.append(Pages(rng[0], rng[1], memoryview(bytes([fill]) * (rng[1] * PAGE))))
        elif kind == "zero":
            out.append(ZeroPages(*rng))
        elif kind == "discard":
            out.append(Discard(*rng))
        elif kind == "progress":
            out.append(Progress(draw(st.integers(0, 2**64 - 1)), 3))
        elif kind == "round":
            out.append(PrecopyRoundEnd(1, 2))
        else:
            out.append(VmState(memoryview(draw(st.binary(max_size=50)))))
    out.append(Switchover())
    return out


@FUZZ
@given(
    frames=source_frames(),
    checksum=st.sampled_from([None, "xxh3", "crc32"]),
    mutation=st.sampled_from(["none", "truncate", "duplicate", "flip", "reorder", "drop"]),
    where=st.integers(0, 10**6),
    bit=st.integers(0, 7),
    cuts=st.lists(st.integers(0, 10**6), max_size=4),
    sink=st.booleans(),
)
def test_mutated_valid_streams(
    frames: list[Any],
    checksum: str | None,
    mutation: str,
    where: int,
    bit: int,
    cuts: list[int],
    sink: bool,
) -> None:
    lb = opened(checksum)
    encoded = [b"".join(bytes(b) for b in lb.source.send(f)) for f in frames]
    if mutation == "duplicate":
        i = where % len(encoded)
        encoded.insert(i, encoded[i])
    elif mutation == "reorder":
        i = where % len(encoded)
        encoded.append(encoded.pop(i))
    elif mutation == "drop":
        del encoded[where % len(encoded)]
    stream = b"".join(encoded)
    if mutation == "truncate":
        stream = stream[: where % (len(stream) + 1)]
    elif mutation == "flip" and stream:
        flipped = bytearray(stream)
        flipped[where % len(stream)] ^= 1 << bit
        stream = bytes(flipped)
    events = consume(lb.dest, split(stream, cuts), sink=sink)
    if mutation == "none":
        if sink:  # sink buffers are reused guest memory: compare headers only
            assert [(type(e), getattr(e, "gpa", None)) for e in events] == [
                (type(f), getattr(f, "gpa", None)) for f in frames
            ]
        else:
            assert events == frames
    if checksum is not None and not sink:
        # Every page payload delivered is one the source sent, at the place it sent it.
        sent = {(f.gpa, f.npages, bytes(f.data)) for f in frames if type(f) is Pages}
        for event in events:
            if type(event) is Pages:
                assert (event.gpa, event.npages, bytes(event.data)) in sent
