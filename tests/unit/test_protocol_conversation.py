"""Whole conversations between two sans-IO Sessions wired in memory (aioquic's model).

Each side is a real :class:`Session`: it feeds its own table from every event it sends
or receives on every connection, so nothing here touches a state table by hand.
Connections are delivered in the order a test chooses, which is how reorderings that
separate TCP connections allow are reproduced (a PageRequest overtaking Running).
Time is an argument: heartbeats and silence are tested without sleeping.
"""

from __future__ import annotations

from typing import Any

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
    Discard,
    Error,
    ErrorCode,
    HandshakeTimeout,
    HeartbeatDue,
    Hello,
    LinkSilent,
    MemoryLayout,
    MemoryRegion,
    MigrationState,
    PageRequest,
    Pages,
    PrecopyRoundAck,
    PrecopyRoundEnd,
    Progress,
    Ready,
    ReceivedBitmap,
    Role,
    Running,
    Session,
    Setup,
    SetupAck,
    Switchover,
    VmState,
    Welcome,
    ZeroPages,
)

PAGE = 4096
LAYOUT = MemoryLayout((MemoryRegion(0, 64 * PAGE, PAGE),))
SID = bytes(range(16))
S = MigrationState
M, U, B = ChannelRole.MAIN, ChannelRole.URGENT, ChannelRole.BULK


def page(n: int = 1, fill: int = 7) -> memoryview:
    return memoryview(bytes([fill]) * (n * PAGE))


class Wire:
    """A source Session and a destination Session with their connections in memory."""

    def __init__(self, *, now: float = 0.0) -> None:
        self.now = now
        self.src = Session(Role.SOURCE, SID, layout=LAYOUT, features=frozenset({"checksum-xxh3"}))
        self.dst = Session(Role.DESTINATION, SID, features=frozenset({"checksum-xxh3"}))
        self.conns: dict[ChannelRole, tuple[Connection, Connection]] = {}
        self.queued: dict[tuple[Role, ChannelRole], list[bytes]] = {}

    def open(self, channel: ChannelRole, *, resume: bool = False) -> list[Any]:
        """Hello → Welcome; returns what the source received after the Welcome."""
        src_conn, hello = self.src.connect(channel, resume=resume, now=self.now)
        dst_conn = Connection(Role.DESTINATION, None)
        dst_conn.receive_data(b"".join(bytes(b) for b in hello))
        got = dst_conn.next_event()
        assert isinstance(got, Hello)
        welcome = self.dst.accept(dst_conn, got, self.now)
        self.conns[channel] = (src_conn, dst_conn)
        self.dst_send(welcome, channel)
        return [e for e in self.deliver(Role.DESTINATION, channel) if not isinstance(e, Welcome)]

    def _conn(self, role: Role, channel: ChannelRole) -> Connection:
        pair = self.conns[channel]
        return pair[0] if role is Role.SOURCE else pair[1]

    def send(
        self, role: Role, event: Any, channel: ChannelRole = M, *, hold: bool = False
    ) -> list[Any]:
        """``role`` sends ``event``; unless ``hold``, the peer decodes it at once."""
        session = self.src if role is Role.SOURCE else self.dst
        data = b"".join(bytes(b) for b in session.send(self._conn(role, channel), event))
        self.queued.setdefault((role, channel), []).append(data)
        return [] if hold else self.deliver(role, channel)

    def src_send(self, event: Any, channel: ChannelRole = M, **kw: Any) -> list[Any]:
        return self.send(Role.SOURCE, event, channel, **kw)

    def dst_send(self, event: Any, channel: ChannelRole = M, **kw: Any) -> list[Any]:
        return self.send(Role.DESTINATION, event, channel, **kw)

    def deliver(self, sender: Role, channel: ChannelRole) -> list[Any]:
        """Everything ``sender`` queued on ``channel``, decoded by the peer's Session."""
        peer = self.dst if sender is Role.SOURCE else self.src
        conn = self._conn(sender.peer, channel)
        for data in self.queued.pop((sender, channel), []):
            conn.receive_data(data)
        out = []
        while (event := peer.next_event(conn)) is not NEED_DATA:
            out.append(event)
        return out

    def cut(self, reason: str = "cut") -> None:
        """Every connection fails on both sides (as a reset would)."""
        for src_conn, dst_conn in self.conns.values():
            self.src.connection_lost(src_conn, reason)
            self.dst.connection_lost(dst_conn, reason)
        self.conns.clear()
        self.queued.clear()

    def to_precopy(self) -> None:
        self.open(M)
        self.src_send(Setup("vm", "u", LAYOUT, 1, "hybrid"))
        self.dst_send(SetupAck())
        self.open(U)
        assert self.src.state is S.ACTIVE and self.dst.state is S.ACTIVE

    def to_ready(self) -> None:
        self.to_precopy()
        self.src_send(Pages(0, 2, page(2)))
        self.src_send(PrecopyRoundEnd(1, 1))
        (ack,) = self.dst_send(PrecopyRoundAck(1, self.dst.payload_bytes))
        assert ack.bytes_received == 2 * PAGE
        self.src_send(Switchover())
        self.src_send(Discard(PAGE, 1))
        self.src_send(VmState(memoryview(b"state")))
        self.dst_send(Ready())
        assert self.src.state is S.READY and self.dst.state is S.READY


def test_full_conversation() -> None:
    w = Wire()
    w.to_ready()
    assert not w.src.point_of_no_return and not w.dst.point_of_no_return
    w.src_send(Commit())
    assert w.src.point_of_no_return and w.dst.point_of_no_return
    w.dst_send(Running())
    w.open(B)
    (req,) = w.dst_send(PageRequest(5, 3 * PAGE, 1), U)
    assert req.request_id == 5
    w.src_send(Pages(3 * PAGE, 1, page(), request_id=5), U)
    w.src_send(ZeroPages(4 * PAGE, 60), B)
    w.src_send(AllSent())
    w.dst_send(Complete(64))
    assert w.src.state is S.COMPLETED and w.dst.state is S.COMPLETED
    w.src_send(CompleteAck())
    assert w.src.payload_bytes == 3 * PAGE and w.dst.payload_bytes == 3 * PAGE


def test_a_page_request_may_overtake_running() -> None:
    """Issue: a PageRequest on URGENT arriving before Running on MAIN paused postcopy."""
    w = Wire()
    w.to_ready()
    w.src_send(Commit())
    w.dst_send(Running(), hold=True)
    w.dst_send(PageRequest(1, 0, 1), U)
    assert w.src.state is S.POSTCOPY_ACTIVE
    assert [type(e) for e in w.deliver(Role.DESTINATION, M)] == [Running]
    assert w.src.state is S.POSTCOPY_ACTIVE


def test_bulk_pages_may_overtake_commit() -> None:
    w = Wire()
    w.to_ready()
    w.src_send(Commit(), hold=True)
    w.open(B)  # the source opens BULK right after Commit; it can arrive first
    (pages,) = w.src_send(Pages(8 * PAGE, 1, page()), B)
    assert w.dst.state is S.READY and pages.npages == 1
    w.deliver(Role.SOURCE, M)
    assert w.dst.state is S.POSTCOPY_ACTIVE


def test_progress_before_setup_ack_and_a_second_setup_ack() -> None:
    """Issue: a Progress before SetupAck failed the migration; a duplicated SetupAck
    was noticed only after switchover."""
    w = Wire()
    w.open(M)
    w.src_send(Setup("vm", "u", LAYOUT, 1, "postcopy"))
    w.dst_send(Progress(0, 64))
    w.dst_send(SetupAck())
    assert w.src.state is S.ACTIVE
    # A misbehaving peer (its own table would refuse): the second one is refused at once.
    w.conns[M][0].receive_data(b"".join(bytes(b) for b in w.conns[M][1].send(SetupAck())))
    with pytest.raises(RemoteProtocolError, match="SetupAck"):
        w.src.next_event(w.conns[M][0])
    assert w.src.state is S.ACTIVE


@pytest.mark.parametrize("stage", ["precopy", "switchover", "device", "ready"])
def test_cancel_is_allowed_until_the_commit(stage: str) -> None:
    w = Wire()
    w.to_precopy()
    if stage != "precopy":
        w.src_send(Switchover())
    if stage in ("device", "ready"):
        w.src_send(VmState(memoryview(b"s")))
    if stage == "ready":
        w.dst_send(Ready())
    w.src_send(Cancel("operator"))
    assert w.src.state is S.CANCELLED and w.dst.state is S.CANCELLED
    assert not w.src.point_of_no_return


def test_cancel_after_the_commit_is_refused() -> None:
    w = Wire()
    w.to_ready()
    w.src_send(Commit())
    with pytest.raises(LocalProtocolError) as exc:
        w.src_send(Cancel("too late"))
    assert exc.value.code == ErrorCode.CANCEL_REFUSED
    assert w.src.state is S.POSTCOPY_ACTIVE


def test_a_refused_state_fails_safely() -> None:
    w = Wire()
    w.to_precopy()
    w.src_send(Switchover())
    w.src_send(VmState(memoryview(b"s")))
    w.dst_send(Error(ErrorCode.RESTORE_FAILED, "cannot restore"))
    assert w.src.state is S.FAILED and not w.src.point_of_no_return
    assert w.dst.state is S.FAILED


def test_link_lost_before_the_commit_leaves_the_vm_on_the_source_and_the_state_in_doubt() -> None:
    w = Wire()
    w.to_ready()
    w.cut("link down")
    assert w.src.state is S.FAILED and not w.src.point_of_no_return  # resumes the VM
    assert w.dst.state is S.READY  # never discards: the source might have committed
    assert w.src.lost_reason == "link down"
    # The source withdraws: a resumed MAIN, then Cancel.
    (again,) = w.open(M, resume=True) or [None]
    w.dst_send(Ready())
    w.src_send(Cancel("the source resumed the VM"))
    assert w.dst.state is S.CANCELLED
    assert again is None


def test_commit_lost_in_flight_is_resolved_on_reconnect() -> None:
    w = Wire()
    w.to_ready()
    w.src_send(Commit(), hold=True)
    w.cut()
    assert w.src.state is S.POSTCOPY_PAUSED and w.src.point_of_no_return
    assert w.dst.state is S.READY and not w.dst.point_of_no_return
    w.src.table.begin_recovery()
    w.open(M, resume=True)
    assert [type(e) for e in w.dst_send(Ready())] == [Ready]
    w.src_send(Commit())
    assert w.src.state is S.POSTCOPY_ACTIVE and w.dst.state is S.POSTCOPY_ACTIVE


def test_recovery_after_the_commit() -> None:
    w = Wire()
    w.to_ready()
    w.src_send(Commit())
    w.cut()
    assert w.src.state is S.POSTCOPY_PAUSED and w.dst.state is S.POSTCOPY_PAUSED
    w.src.table.begin_recovery()
    w.dst.table.begin_recovery()
    w.open(M, resume=True)
    bitmap = bytearray(LAYOUT.bitmap_nbytes)
    bitmap[0] = 0b11
    (got,) = w.dst_send(ReceivedBitmap(memoryview(bytes(bitmap))))
    assert isinstance(got, ReceivedBitmap) and bytes(got.data)[0] == 0b11
    assert w.src.state is S.POSTCOPY_ACTIVE and w.dst.state is S.POSTCOPY_ACTIVE
    w.open(U, resume=True)


def test_completion_missed_by_the_source_is_repeated_on_reconnect() -> None:
    w = Wire()
    w.to_ready()
    w.src_send(Commit())
    w.dst_send(Complete(64), hold=True)
    assert w.dst.state is S.COMPLETED
    w.cut()
    assert w.src.state is S.POSTCOPY_PAUSED and w.dst.state is S.COMPLETED
    w.src.table.begin_recovery()
    w.open(M, resume=True)
    w.dst_send(Complete(64))
    assert w.src.state is S.COMPLETED


def test_pages_travel_on_main_until_the_commit() -> None:
    w = Wire()
    w.to_precopy()
    with pytest.raises(LocalProtocolError, match="MAIN only"):
        w.src_send(Pages(0, 1, page()), U)


def test_a_refused_bulk_connection_leaves_the_session_alone() -> None:
    w = Wire()
    w.to_ready()
    w.src_send(Commit())
    conn, _hello = w.src.connect(B, resume=False, now=0)
    w.src.connection_lost(conn, "refused")
    assert w.src.state is S.POSTCOPY_ACTIVE


def test_heartbeat_and_silence_without_sleeping() -> None:
    w = Wire(now=100.0)
    w.to_precopy()
    src = w.src
    assert src.next_timer() == pytest.approx(101.0)  # the first heartbeat is due
    assert src.handle_timer(100.5) == []
    (due,) = src.handle_timer(101.0)
    assert isinstance(due, HeartbeatDue) and due.conn is w.conns[M][0]
    assert isinstance(src.heartbeat(), Progress)
    events = src.handle_timer(105.2)
    silent = [e for e in events if isinstance(e, LinkSilent)]
    assert silent and silent[0].silent_s == pytest.approx(5.2)
    assert silent[0].reason == "no heartbeat from the destination for 5.2 s"
    assert src.state is S.FAILED and src.lost_reason == silent[0].reason


def test_bytes_keep_the_link_alive() -> None:
    w = Wire(now=0.0)
    w.to_precopy()
    w.src.data_received(w.conns[M][0], 4.0)
    assert not [e for e in w.src.handle_timer(6.0) if isinstance(e, LinkSilent)]
    assert [e for e in w.src.handle_timer(9.5) if isinstance(e, LinkSilent)]


def test_handshake_deadline() -> None:
    src = Session(Role.SOURCE, SID, layout=LAYOUT, handshake_timeout_s=10.0)
    conn, _ = src.connect(M, resume=False, now=0.0)
    assert src.next_timer() == 10.0
    (due,) = src.handle_timer(10.0)
    assert isinstance(due, HandshakeTimeout) and due.conn is conn


def test_a_version_1_peer_gets_a_clear_refusal() -> None:
    dst = Session(Role.DESTINATION, SID)
    conn = Connection(Role.DESTINATION, None)
    conn.receive_data(
        b"".join(
            bytes(b)
            for b in Connection(Role.SOURCE, M).send(Hello(1, 1, M, SID, frozenset(), False))
        )
    )
    hello = conn.next_event()
    with pytest.raises(RemoteProtocolError) as exc:
        dst.accept(conn, hello, 0.0)
    assert exc.value.code == ErrorCode.VERSION
    assert "1..1" in str(exc.value) and "2..2" in str(exc.value)


def test_an_empty_version_range_is_a_bad_frame() -> None:
    dst = Session(Role.DESTINATION, SID)
    conn = Connection(Role.DESTINATION, None)
    conn.receive_data(
        b"".join(
            bytes(b)
            for b in Connection(Role.SOURCE, M).send(Hello(2, 3, M, SID, frozenset(), False))
        )
    )
    with pytest.raises(RemoteProtocolError) as exc:
        dst.accept(conn, conn.next_event(), 0.0)
    assert exc.value.code == ErrorCode.BAD_FRAME


def test_a_second_session_is_refused_as_busy() -> None:
    w = Wire()
    w.to_precopy()
    other = Session(Role.SOURCE, bytes(16), layout=LAYOUT)
    _conn, hello = other.connect(M, resume=False, now=0)
    dst_conn = Connection(Role.DESTINATION, None)
    dst_conn.receive_data(b"".join(bytes(b) for b in hello))
    with pytest.raises(RemoteProtocolError) as exc:
        w.dst.accept(dst_conn, dst_conn.next_event(), 0.0)
    assert exc.value.code == ErrorCode.SESSION_UNKNOWN
