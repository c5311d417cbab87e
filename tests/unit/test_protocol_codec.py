"""Framing: every message round-trips, at every split, through the sink, and hostile
frames are rejected before any payload is handed out."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from migrated.errors import LocalProtocolError, RemoteProtocolError
from migrated.protocol import (
    NEED_DATA,
    AllSent,
    Cancel,
    ChannelRole,
    Commit,
    Complete,
    CompleteAck,
    Connection,
    ConnectionClosed,
    Discard,
    DiscardBitmap,
    Error,
    ErrorCode,
    Hello,
    MemoryLayout,
    MemoryRegion,
    PageRequest,
    Pages,
    PrecopyRoundAck,
    PrecopyRoundEnd,
    Progress,
    Ready,
    ReceivedBitmap,
    Role,
    Running,
    Setup,
    SetupAck,
    Switchover,
    VmState,
    Welcome,
    ZeroPages,
    codec,
)
from migrated.protocol.loopback import Loopback, drain

PAGE = 4096
LAYOUT = MemoryLayout((MemoryRegion(0, 16 * PAGE, PAGE), MemoryRegion(1 << 30, 1 << 21, 1 << 21)))
SID = b"S" * 16


def open_pair(checksum: str | None = "xxh3", resume: bool = False) -> Loopback:
    lb = Loopback(layout=LAYOUT)
    features = frozenset() if checksum is None else frozenset({f"checksum-{checksum}"})
    lb.handshake(SID, source_features=features, dest_features=features, resume=resume)
    assert lb.source.checksum == checksum
    return lb


def data(nbytes: int, seed: int = 1) -> memoryview:
    return memoryview(bytes((seed + i * 7) & 0xFF for i in range(nbytes)))


# Every wire message, sent by the role allowed to send it on MAIN after the handshake.
SOURCE_MESSAGES: list[Any] = [
    Setup("vm-ü", "0f8fad5b-d9cb-469f-a165-70867728950e", LAYOUT, 4, "postcopy"),
    Pages(PAGE, 2, data(2 * PAGE)),
    Pages(1 << 30, 1, data(1 << 21, 3), request_id=2**64 - 1),
    ZeroPages(0, 16),
    ZeroPages(1 << 30, 1, request_id=9),
    Discard(15 * PAGE, 1),
    DiscardBitmap(data(LAYOUT.bitmap_nbytes, 7)),
    PrecopyRoundEnd(3, 1234),
    Switchover(),
    Commit(),
    VmState(data(1000)),
    VmState(memoryview(b"")),
    Progress(2**63, 0),
    AllSent(),
    CompleteAck(),
    Cancel("because"),
    Error("internal", "boom"),
]
DEST_MESSAGES: list[Any] = [
    SetupAck(),
    PrecopyRoundAck(3, 2**40),
    Ready(),
    Running(),
    PageRequest(1, 3 * PAGE, 2),
    Progress(0, 17),
    Complete(17),
    Error("checksum", "bad"),
]


def roundtrip(sender: Connection, receiver: Connection, event: Any) -> Any:
    wire = b"".join(bytes(b) for b in sender.send(event))
    receiver.receive_data(wire)
    (got,) = drain(receiver)
    return got


@pytest.mark.parametrize("checksum", [None, "xxh3", "crc32"])
@pytest.mark.parametrize("event", SOURCE_MESSAGES, ids=lambda e: type(e).__name__)
def test_source_messages_roundtrip(checksum: str | None, event: Any) -> None:
    lb = open_pair(checksum)
    assert roundtrip(lb.source, lb.dest, event) == event


@pytest.mark.parametrize("event", DEST_MESSAGES, ids=lambda e: type(e).__name__)
def test_dest_messages_roundtrip(event: Any) -> None:
    lb = open_pair()
    assert roundtrip(lb.dest, lb.source, event) == event


def test_handshake_messages_roundtrip() -> None:
    lb = Loopback()
    hello = Hello(3, 2, ChannelRole.MAIN, SID, frozenset({"a", "checksum-crc32"}), False)
    assert roundtrip(lb.source, lb.dest, hello) == hello
    welcome = Welcome(2, frozenset({"a"}), SID)
    assert roundtrip(lb.dest, lb.source, welcome) == welcome
    bitmap_pair = Loopback(layout=LAYOUT)
    bitmap_pair.handshake(SID, resume=True)
    bitmap = ReceivedBitmap(data(LAYOUT.bitmap_nbytes))
    assert roundtrip(bitmap_pair.dest, bitmap_pair.source, bitmap) == bitmap


def test_every_message_type_is_covered() -> None:
    covered = {type(e) for e in SOURCE_MESSAGES + DEST_MESSAGES}
    covered |= {Hello, Welcome, ReceivedBitmap}
    assert covered == {spec.cls for spec in codec.MESSAGES}


def conversation_bytes() -> tuple[bytes, list[Any]]:
    """A small multi-frame stream (source → destination) and the events it holds."""
    lb = Loopback(layout=LAYOUT)
    events = [
        Hello(2, 2, ChannelRole.MAIN, SID, frozenset({"checksum-xxh3"}), False),
        Pages(0, 1, data(PAGE)),
        ZeroPages(PAGE, 2),
        VmState(data(37)),
        Pages(2 * PAGE, 1, data(PAGE, 5), 4),
    ]
    wire = bytearray()
    wire += b"".join(bytes(b) for b in lb.source.send(events[0]))
    lb.dest.receive_data(bytes(wire))
    drain(lb.dest)
    lb.send(lb.dest, Welcome(2, frozenset({"checksum-xxh3"}), SID))
    for event in events[1:]:
        wire += b"".join(bytes(b) for b in lb.source.send(event))
    return bytes(wire), events


def fresh_dest() -> Connection:
    return Connection(Role.DESTINATION, layout=LAYOUT)


def answer_welcome(dest: Connection, events: list[Any]) -> None:
    """The destination must answer Hello before it may receive anything else."""
    if dest.hello is not None and dest.welcome is None:
        dest.send(Welcome(2, frozenset({"checksum-xxh3"}), SID))


def feed_in_pieces(pieces: list[bytes], *, sink: bool = False) -> list[Any]:
    dest = fresh_dest()
    memory = bytearray(3 * PAGE)
    blobs: list[bytearray] = []

    def sink_fn(header: Any) -> memoryview | None:
        if type(header) is Pages:
            return memoryview(memory)[header.gpa : header.gpa + header.npages * PAGE]
        blobs.append(bytearray(37))
        return memoryview(blobs[-1])

    if sink:
        dest.set_payload_sink(sink_fn)
    out: list[Any] = []
    for piece in pieces:
        if not piece:
            continue  # b"" would mean EOF
        dest.receive_data(piece)
        while True:
            event = dest.next_event()
            if event is NEED_DATA:
                break
            assert type(event) is not ConnectionClosed
            out.append(event)
            answer_welcome(dest, out)
    dest.receive_data(b"")
    assert type(dest.next_event()) is ConnectionClosed
    return out


def test_split_at_every_byte_boundary() -> None:
    wire, events = conversation_bytes()
    assert feed_in_pieces([wire]) == events
    for cut in range(1, len(wire)):
        assert feed_in_pieces([wire[:cut], wire[cut:]]) == events, cut


def test_split_at_every_byte_boundary_with_sink() -> None:
    wire, events = conversation_bytes()
    for cut in range(0, len(wire), 7):
        assert feed_in_pieces([wire[:cut], wire[cut:]], sink=True) == events, cut


def test_one_byte_at_a_time() -> None:
    wire, events = conversation_bytes()
    assert feed_in_pieces([wire[i : i + 1] for i in range(len(wire))]) == events
    assert feed_in_pieces([wire[i : i + 1] for i in range(len(wire))], sink=True) == events


def test_sink_receives_payload_in_place_via_payload_target() -> None:
    lb = open_pair("crc32")
    guest = bytearray(16 * PAGE)
    seen: list[Any] = []

    def sink(header: Any) -> memoryview:
        seen.append(header)
        assert header.data is None
        return memoryview(guest)[header.gpa : header.gpa + header.npages * PAGE]

    lb.dest.set_payload_sink(sink)
    header, payload = lb.source.send(Pages(4 * PAGE, 3, data(3 * PAGE, 9)))
    assert payload.obj is not None  # zero-copy: the caller's buffer itself
    lb.dest.receive_data(bytes(header) + bytes(payload[:100]))  # payload start buffered
    assert lb.dest.next_event() is NEED_DATA
    assert lb.dest.in_payload
    target = lb.dest.payload_target()
    assert target is not None and target.nbytes == 3 * PAGE - 100
    target[:5000] = payload[100:5100]
    lb.dest.payload_written(5000)
    target = lb.dest.payload_target()
    target[:] = payload[5100:]
    lb.dest.payload_written(target.nbytes)
    assert lb.dest.payload_target() is None
    event = lb.dest.next_event()
    assert event.data.obj is guest
    assert bytes(guest[4 * PAGE : 7 * PAGE]) == bytes(payload)
    assert seen == [event]


def test_sink_with_wrong_buffer_is_a_local_error() -> None:
    lb = open_pair()
    lb.dest.set_payload_sink(lambda header: memoryview(bytearray(10)))
    lb.dest.receive_data(b"".join(bytes(b) for b in lb.source.send(Pages(0, 1, data(PAGE)))))
    with pytest.raises(LocalProtocolError):
        lb.dest.next_event()


def test_sink_may_decline() -> None:
    lb = open_pair()
    lb.dest.set_payload_sink(lambda header: None)
    assert roundtrip(lb.source, lb.dest, Pages(0, 1, data(PAGE))).data == data(PAGE)


def test_fast_path_matches_table_path() -> None:
    """The hand-inlined Pages encoder produces exactly the table's bytes."""
    for algo in (None, "xxh3", "crc32"):
        lb = open_pair(algo)
        event = Pages(1 << 30, 1, data(1 << 21), 5)
        header, _ = lb.source.send(event)
        spec, wire = codec.encode_fields(event)
        trailer, _ = codec.encode_trailer(spec, event, LAYOUT, 16 << 20, algo)
        assert bytes(header) == codec.packb(wire + trailer)
        assert msgpack.unpackb(bytes(header))[0] == codec.PAGES_CODE


# --- hostility ---------------------------------------------------------------------


def frame(*header: Any, payload: bytes = b"") -> bytes:
    return msgpack.packb(list(header), use_bin_type=True) + payload


def receive_raw(raw: bytes, checksum: str | None = None) -> RemoteProtocolError:
    lb = open_pair(checksum)
    handed_out: list[Any] = []
    lb.dest.set_payload_sink(lambda header: handed_out.append(header))  # type: ignore[func-returns-value]
    lb.dest.receive_data(raw)
    with pytest.raises(RemoteProtocolError) as exc:
        while True:
            event = lb.dest.next_event()
            assert event is not NEED_DATA, "frame was accepted or waited for more data"
            handed_out.append(event)
    assert handed_out == []
    return exc.value


@pytest.mark.parametrize(
    ("header", "code"),
    [
        ((6, 1, 1, 0, None), ErrorCode.BAD_RANGE),  # unaligned
        ((6, 16 * PAGE, 1, 0, None), ErrorCode.BAD_RANGE),  # past region 0
        ((6, 15 * PAGE, 2, 0, None), ErrorCode.BAD_RANGE),  # straddles the end
        ((6, 0, 0, 0, None), ErrorCode.BAD_FRAME),  # zero pages
        ((6, (1 << 30) + PAGE, 1, 0, None), ErrorCode.BAD_RANGE),  # not 2 MiB aligned
        ((6, 1 << 40, 1, 0, None), ErrorCode.BAD_RANGE),  # no region
        ((6, -1, 1, 0, None), ErrorCode.BAD_FRAME),
        ((6, 0, 1, 0, 12), ErrorCode.BAD_FRAME),  # checksum not negotiated
        ((6, 0, 1.0, 0, None), ErrorCode.BAD_FRAME),
        ((6, 0, 1, 0), ErrorCode.BAD_FRAME),  # short header
        ((7, 0, 17, 0), ErrorCode.BAD_RANGE),
        ((8, 8 * PAGE, 9, 0), ErrorCode.BAD_FRAME),  # Discard has two fields
        ((8, 8 * PAGE, 9), ErrorCode.BAD_RANGE),
        ((11, 64 * 1024 * 1024 + 1, None), ErrorCode.FRAME_TOO_LARGE),
        ((99,), ErrorCode.BAD_FRAME),
        ((4, "vm", "u", [[0, PAGE, 3]], 1, "x"), ErrorCode.UNEXPECTED),  # Setup: fine shape...
        ((10, 1), ErrorCode.BAD_FRAME),
        ((3, 1, "x"), ErrorCode.BAD_FRAME),
        ((True, 1), ErrorCode.BAD_FRAME),
    ],
)
def test_hostile_headers_are_rejected(header: tuple[Any, ...], code: str) -> None:
    err = receive_raw(frame(*header, payload=bytes(PAGE)))
    assert err.code in (code, ErrorCode.BAD_LAYOUT), str(err)


def test_bad_layout_in_setup() -> None:
    lb = Loopback()
    lb.handshake(SID)
    for regions in ([[0, PAGE, 3]], [[0, PAGE, PAGE], [0, PAGE, PAGE]], [], [[1, PAGE, PAGE]]):
        dest = Connection(Role.DESTINATION)
        dest.receive_data(frame(1, 2, 2, 0, SID, [], False))
        dest.next_event()
        dest.send(Welcome(2, frozenset(), SID))
        dest.receive_data(frame(4, "vm", "u", regions, 1, "postcopy"))
        with pytest.raises(RemoteProtocolError) as exc:
            dest.next_event()
        assert exc.value.code == ErrorCode.BAD_LAYOUT


def test_page_request_limits() -> None:
    lb = open_pair()
    big = msgpack.packb([13, 1, 1 << 30, 1], use_bin_type=True)
    lb.source.receive_data(big)
    assert lb.source.next_event() == PageRequest(1, 1 << 30, 1)
    too_many = Loopback(layout=MemoryLayout((MemoryRegion(0, 1024 * PAGE, PAGE),)))
    too_many.handshake(SID)
    too_many.source.receive_data(msgpack.packb([13, 1, 0, 513], use_bin_type=True))
    with pytest.raises(RemoteProtocolError):
        too_many.source.next_event()
    with pytest.raises(LocalProtocolError):
        too_many.dest.send(PageRequest(2, 0, 513))
    with pytest.raises(LocalProtocolError):
        too_many.dest.send(PageRequest(0, 0, 1))  # request ids are nonzero


def test_checksum_mismatch_rejected_and_payload_withheld() -> None:
    for algo in ("xxh3", "crc32"):
        lb = open_pair(algo)
        header, payload = lb.source.send(Pages(0, 1, data(PAGE)))
        corrupted = bytearray(payload)
        corrupted[100] ^= 1
        lb.dest.receive_data(bytes(header) + bytes(corrupted))
        with pytest.raises(RemoteProtocolError) as exc:
            lb.dest.next_event()
        assert exc.value.code == ErrorCode.CHECKSUM
        with pytest.raises(RemoteProtocolError):  # the connection stays dead
            lb.dest.next_event()


def test_missing_checksum_rejected() -> None:
    err = receive_raw(frame(6, 0, 1, 0, None, payload=bytes(PAGE)), checksum="xxh3")
    assert err.code == ErrorCode.BAD_FRAME


def test_oversized_header_rejected() -> None:
    lb = open_pair()
    # array, code, str32 of 4 GiB: waits for at most 64 KiB of header, then refuses.
    lb.dest.receive_data(b"\x92\x03\xdb\xff\xff\xff\xff")
    assert lb.dest.next_event() is NEED_DATA
    lb.dest.receive_data(bytes(70 * 1024))
    with pytest.raises(RemoteProtocolError):
        lb.dest.next_event()
    lb = open_pair()
    lb.dest.receive_data(b"\xdd\x00\x01\x00\x00" + b"\xc0" * (70 * 1024))  # 65536-element array
    with pytest.raises(RemoteProtocolError) as exc:
        lb.dest.next_event()
    assert exc.value.code in (ErrorCode.BAD_FRAME, ErrorCode.FRAME_TOO_LARGE)


def test_max_frame_payload_is_enforced() -> None:
    lb = Loopback(layout=LAYOUT, max_frame_payload=2 * PAGE)
    lb.handshake(SID, source_features=frozenset())
    with pytest.raises(LocalProtocolError):
        lb.source.send(Pages(0, 3, data(3 * PAGE)))
    lb.dest.receive_data(frame(6, 0, 3, 0, None, payload=bytes(3 * PAGE)))
    with pytest.raises(RemoteProtocolError) as exc:
        lb.dest.next_event()
    assert exc.value.code == ErrorCode.FRAME_TOO_LARGE


def test_send_validation() -> None:
    lb = open_pair()
    with pytest.raises(LocalProtocolError):
        lb.source.send(Pages(0, 2, data(PAGE)))  # payload too short
    with pytest.raises(LocalProtocolError):
        lb.source.send(Pages(PAGE // 2, 1, data(PAGE)))
    with pytest.raises(LocalProtocolError):
        lb.source.send(Pages(0, 1, None))
    with pytest.raises(LocalProtocolError):
        lb.source.send(Cancel("x" * 5000))
    with pytest.raises(LocalProtocolError):
        lb.source.send(Progress(-1, 0))
    with pytest.raises(LocalProtocolError):
        lb.source.send(Running())  # destination-only
    lb.source.send(Error("internal", "bye"))
    with pytest.raises(LocalProtocolError):
        lb.source.send(Progress(0, 0))


def test_nothing_after_error() -> None:
    lb = open_pair()
    lb.dest.receive_data(frame(3, "internal", "bye") + frame(14, 0, 0))
    assert lb.dest.next_event() == Error("internal", "bye")
    with pytest.raises(RemoteProtocolError):
        lb.dest.next_event()


def test_pages_before_layout() -> None:
    lb = Loopback()
    lb.handshake(SID, source_features=frozenset())
    lb.dest.receive_data(frame(6, 0, 1, 0, None, payload=bytes(PAGE)))
    with pytest.raises(RemoteProtocolError) as exc:
        lb.dest.next_event()
    assert exc.value.code == ErrorCode.UNEXPECTED


def test_received_bitmap_length_must_match_layout() -> None:
    lb = Loopback(layout=LAYOUT)
    lb.handshake(SID, resume=True)
    with pytest.raises(LocalProtocolError):
        lb.dest.send(ReceivedBitmap(data(LAYOUT.bitmap_nbytes + 1)))
    lb.source.receive_data(frame(19, LAYOUT.bitmap_nbytes + 1, None) + bytes(100))
    with pytest.raises(RemoteProtocolError):
        lb.source.next_event()


def test_layout_queries() -> None:
    assert LAYOUT.total_pages == 17
    assert LAYOUT.page_index(1 << 30) == 16
    assert LAYOUT.gpa_of(16) == 1 << 30
    assert LAYOUT.gpa_of(3) == 3 * PAGE
    LAYOUT.check_range(0, 16)
    with pytest.raises(RemoteProtocolError) as exc:
        LAYOUT.check_range(0, 17)
    assert exc.value.code == "bad-range"
    with pytest.raises(RemoteProtocolError):
        LAYOUT.gpa_of(17)
    with pytest.raises(ValueError):
        MemoryLayout(tuple(MemoryRegion(i * PAGE, PAGE, PAGE) for i in range(65)))
    with pytest.raises(ValueError):
        MemoryLayout((MemoryRegion(0, PAGE, 2 << 30),))


def test_bitmap_missing_runs() -> None:
    from migrated.protocol import bitmap_missing_runs

    assert bitmap_missing_runs(b"\xff\xff", 16) == []
    assert bitmap_missing_runs(b"\x00\x00", 16) == [(0, 16)]
    assert bitmap_missing_runs(b"\xfd\xff\x0f", 20) == [(1, 1)]
    assert bitmap_missing_runs(b"\xff\x0f\xff\x01", 25) == [(12, 4)]
    assert bitmap_missing_runs(b"\x00\xff\x00", 20) == [(0, 8), (16, 4)]
    bits = bytearray(LAYOUT.bitmap_nbytes)
    bits[0] = 0b11111101
    assert bitmap_missing_runs(bits, LAYOUT.total_pages) == [(1, 1), (8, 9)]
