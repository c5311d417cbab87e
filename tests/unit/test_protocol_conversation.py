"""Whole conversations between two sans-IO endpoints wired in memory."""

from __future__ import annotations

from typing import Any

import pytest

from migrated.errors import LocalProtocolError, RemoteProtocolError
from migrated.protocol import (
    NEED_DATA,
    AllSent,
    Cancel,
    ChannelRole,
    Complete,
    CompleteAck,
    Connection,
    Discard,
    Error,
    ErrorCode,
    Hello,
    MemoryLayout,
    MemoryRegion,
    MigrationState,
    PageRequest,
    Pages,
    PrecopyRoundEnd,
    Progress,
    ReceivedBitmap,
    Role,
    Running,
    SessionState,
    Setup,
    SetupAck,
    Switchover,
    VmState,
    Welcome,
    ZeroPages,
    negotiate,
)
from migrated.protocol.loopback import Loopback

PAGE = 4096
LAYOUT = MemoryLayout(
    (MemoryRegion(0, 64 * PAGE, PAGE), MemoryRegion(1 << 32, 2 * (2 << 20), 2 << 20))
)
SID = bytes(range(16))
S = MigrationState


class Session:
    """Both sides of one migration session: a Loopback per channel + two SessionStates."""

    def __init__(self) -> None:
        self.src = SessionState(Role.SOURCE)
        self.dst = SessionState(Role.DESTINATION)
        self.links: dict[ChannelRole, Loopback] = {}

    def open(self, channel: ChannelRole, *, resume: bool = False) -> Loopback:
        layout = None if channel is ChannelRole.MAIN and not resume else LAYOUT
        lb = Loopback(channel, layout=layout)
        self.links[channel] = lb
        hello = Hello(1, 1, channel, SID, frozenset({"checksum-xxh3"}), resume)
        self.xfer(channel, Role.SOURCE, hello)
        self.xfer(channel, Role.DESTINATION, negotiate(lb.dest.hello, frozenset({"checksum-xxh3"})))
        return lb

    def xfer(self, channel: ChannelRole, sender: Role, event: Any) -> list[Any]:
        lb = self.links[channel]
        conn = lb.source if sender is Role.SOURCE else lb.dest
        mine, theirs = (self.src, self.dst) if sender is Role.SOURCE else (self.dst, self.src)
        mine.handle(event, "sent", channel=channel)
        got = lb.send(conn, event)
        for item in got:
            theirs.handle(item, "received", channel=channel)
        return got

    def src_send(self, event: Any, channel: ChannelRole = ChannelRole.MAIN) -> list[Any]:
        return self.xfer(channel, Role.SOURCE, event)

    def dst_send(self, event: Any, channel: ChannelRole = ChannelRole.MAIN) -> list[Any]:
        return self.xfer(channel, Role.DESTINATION, event)

    def setup(self) -> None:
        self.open(ChannelRole.MAIN)
        self.open(ChannelRole.URGENT)
        (setup,) = self.src_send(Setup("vm1", "uuid-1", LAYOUT, 2, "postcopy"))
        assert setup.layout == LAYOUT
        self.dst_send(SetupAck())
        assert self.src.state is self.dst.state is S.ACTIVE


def page_bytes(npages: int, fill: int, page_size: int = PAGE) -> memoryview:
    return memoryview(bytes([fill]) * (npages * page_size))


def run_to_postcopy(sess: Session) -> None:
    sess.setup()
    (got,) = sess.src_send(Pages(0, 4, page_bytes(4, 1)))
    assert bytes(got.data) == bytes(page_bytes(4, 1)) and got.gpa == 0 and got.npages == 4
    assert sess.src_send(ZeroPages(4 * PAGE, 8)) == [ZeroPages(4 * PAGE, 8)]
    sess.src_send(PrecopyRoundEnd(1, 3))
    sess.src_send(Progress(16384, 60))
    sess.dst_send(Progress(0, 0))
    sess.src_send(Switchover())
    assert sess.src.state is sess.dst.state is S.SWITCHOVER
    assert sess.src_send(Discard(PAGE, 2)) == [Discard(PAGE, 2)]
    sess.src_send(Pages(PAGE, 1, page_bytes(1, 2)))
    (state,) = sess.src_send(VmState(memoryview(b"cpu+devices")))
    assert bytes(state.data) == b"cpu+devices"
    assert sess.src.state is sess.dst.state is S.DEVICE
    assert not sess.src.point_of_no_return
    sess.dst_send(Running())
    assert sess.src.state is sess.dst.state is S.POSTCOPY_ACTIVE
    assert sess.src.point_of_no_return and sess.dst.point_of_no_return


def finish(sess: Session) -> None:
    (req,) = sess.dst_send(PageRequest(7, 1 << 32, 1), ChannelRole.URGENT)
    assert req == PageRequest(7, 1 << 32, 1)
    (ans,) = sess.src_send(Pages(1 << 32, 1, page_bytes(1, 9, 2 << 20), 7), ChannelRole.URGENT)
    assert ans.request_id == 7 and ans.data.nbytes == 2 << 20
    sess.src_send(AllSent())
    sess.dst_send(Complete(LAYOUT.total_pages))
    assert sess.src.state is S.COMPLETED
    sess.src_send(CompleteAck())
    assert sess.src.state is sess.dst.state is S.COMPLETED


def test_full_conversation() -> None:
    sess = Session()
    run_to_postcopy(sess)
    finish(sess)
    assert sess.src.point_of_no_return


def test_recovery_conversation() -> None:
    sess = Session()
    run_to_postcopy(sess)
    sess.dst_send(PageRequest(1, 8 * PAGE, 2), ChannelRole.URGENT)
    # The network breaks: both sides pause, the guest stays on the destination.
    assert sess.src.link_lost() is S.POSTCOPY_PAUSED
    assert sess.dst.link_lost() is S.POSTCOPY_PAUSED
    assert sess.src.begin_recovery() is S.POSTCOPY_RECOVER
    # A failed first attempt returns to paused.
    assert sess.src.link_lost() is S.POSTCOPY_PAUSED
    sess.src.begin_recovery()
    sess.dst.begin_recovery()
    sess.open(ChannelRole.MAIN, resume=True)
    bitmap = bytearray(LAYOUT.bitmap_nbytes)
    bitmap[0] = 0b11111101  # page 1 was discarded, so not received
    (got,) = sess.dst_send(ReceivedBitmap(memoryview(bitmap)))
    assert bytes(got.data) == bytes(bitmap)
    assert sess.src.state is sess.dst.state is S.POSTCOPY_ACTIVE
    sess.src_send(Pages(PAGE, 1, page_bytes(1, 3)))
    sess.open(ChannelRole.URGENT, resume=True)
    finish(sess)


def test_resumed_main_must_send_bitmap_first() -> None:
    lb = Loopback(layout=LAYOUT)
    lb.handshake(SID, resume=True)
    with pytest.raises(LocalProtocolError):
        lb.dest.send(Progress(0, 0))
    bitmap = memoryview(bytes(LAYOUT.bitmap_nbytes))
    assert lb.send(lb.dest, ReceivedBitmap(bitmap))[0].data == bitmap
    with pytest.raises(LocalProtocolError):
        lb.dest.send(ReceivedBitmap(bitmap))


def test_cancel_before_switchover() -> None:
    sess = Session()
    sess.setup()
    sess.src_send(Pages(0, 1, page_bytes(1, 1)))
    sess.src_send(Cancel("operator asked"))
    assert sess.src.state is sess.dst.state is S.CANCELLED
    assert not sess.src.point_of_no_return


def test_cancel_after_running_is_refused() -> None:
    sess = Session()
    run_to_postcopy(sess)
    with pytest.raises(LocalProtocolError) as local:
        sess.src.handle(Cancel("too late"), "sent")
    assert local.value.code == ErrorCode.CANCEL_REFUSED
    with pytest.raises(RemoteProtocolError) as remote:
        sess.dst.handle(Cancel("too late"), "received")
    assert remote.value.code == ErrorCode.CANCEL_REFUSED
    assert sess.src.state is sess.dst.state is S.POSTCOPY_ACTIVE


def test_destination_refuses_vm_state_before_running() -> None:
    sess = Session()
    sess.setup()
    sess.src_send(Switchover())
    sess.src_send(VmState(memoryview(b"x")))
    sess.dst_send(Error("internal", "cannot load device state"))
    assert sess.src.state is sess.dst.state is S.FAILED
    assert not sess.src.point_of_no_return  # the source may resume the VM


def test_link_lost_in_device_state_pauses_the_source() -> None:
    sess = Session()
    sess.setup()
    sess.src_send(Switchover())
    sess.src_send(VmState(memoryview(b"x")))
    assert sess.src.link_lost() is S.POSTCOPY_PAUSED
    assert sess.src.point_of_no_return
    assert sess.dst.link_lost() is S.FAILED


def test_error_on_urgent_in_device_state_counts_as_link_loss() -> None:
    src = SessionState(Role.SOURCE)
    for event, direction in [
        (SetupAck(), "received"),
        (Switchover(), "sent"),
        (VmState(memoryview(b"")), "sent"),
    ]:
        src.handle(event, direction)
    src.handle(Error("x", "y"), "received", channel=ChannelRole.URGENT)
    assert src.state is S.POSTCOPY_PAUSED


def test_link_lost_before_switchover_fails_safely() -> None:
    sess = Session()
    sess.setup()
    assert sess.src.link_lost() is S.FAILED
    assert not sess.src.point_of_no_return


def test_abandon_keeps_point_of_no_return() -> None:
    sess = Session()
    run_to_postcopy(sess)
    sess.src.link_lost()
    assert sess.src.abandon() is S.FAILED
    assert sess.src.point_of_no_return


def test_resume_hello_rules() -> None:
    state = SessionState(Role.DESTINATION)
    with pytest.raises(RemoteProtocolError):
        state.handle(Hello(1, 1, ChannelRole.MAIN, SID, frozenset(), True), "received")
    paused = SessionState(Role.DESTINATION)
    for event, direction in [
        (SetupAck(), "sent"),
        (Switchover(), "received"),
        (VmState(memoryview(b"")), "received"),
        (Running(), "sent"),
    ]:
        paused.handle(event, direction)
    paused.link_lost()
    with pytest.raises(RemoteProtocolError):
        paused.handle(Hello(1, 1, ChannelRole.MAIN, SID, frozenset(), False), "received")
    paused.handle(Hello(1, 1, ChannelRole.MAIN, SID, frozenset(), True), "received")
    assert paused.state is S.POSTCOPY_RECOVER


def test_version_refusal_names_both_versions() -> None:
    lb = Loopback()
    (hello,) = lb.send(lb.source, Hello(7, 5, ChannelRole.MAIN, SID, frozenset(), False))
    with pytest.raises(RemoteProtocolError) as exc:
        negotiate(hello, frozenset())
    assert exc.value.code == ErrorCode.VERSION
    assert "5..7" in str(exc.value) and "1..1" in str(exc.value)
    (err,) = lb.send(lb.dest, Error(exc.value.code, str(exc.value)))
    assert err.code == "version"
    with pytest.raises(LocalProtocolError):
        lb.source.send(Setup("vm", "u", LAYOUT, 1, "postcopy"))


def test_feature_negotiation_picks_checksum() -> None:
    for offered, accepted, algo in [
        ({"checksum-xxh3", "checksum-crc32"}, {"checksum-crc32", "checksum-xxh3"}, "xxh3"),
        ({"checksum-crc32", "future-thing"}, {"checksum-crc32", "checksum-xxh3"}, "crc32"),
        ({"checksum-xxh3"}, {"checksum-crc32"}, None),
    ]:
        lb = Loopback()
        _, welcome = lb.handshake(
            SID, source_features=frozenset(offered), dest_features=frozenset(accepted)
        )
        assert welcome.features == frozenset(offered) & frozenset(accepted)
        assert lb.source.checksum == lb.dest.checksum == algo


def test_welcome_must_match_hello() -> None:
    lb = Loopback()
    lb.send(lb.source, Hello(1, 1, ChannelRole.MAIN, SID, frozenset(), False))
    with pytest.raises(LocalProtocolError):
        lb.dest.send(Welcome(1, frozenset({"checksum-xxh3"}), SID))  # never offered
    with pytest.raises(LocalProtocolError):
        lb.dest.send(Welcome(1, frozenset(), bytes(16)))  # other session


def test_nothing_before_welcome() -> None:
    src = Connection(Role.SOURCE)
    with pytest.raises(LocalProtocolError):
        src.send(Setup("vm", "u", LAYOUT, 1, "postcopy"))
    dst = Connection(Role.DESTINATION)
    with pytest.raises(LocalProtocolError):
        dst.send(Welcome(1, frozenset(), SID))
    lb = Loopback()
    lb.send(lb.source, Hello(1, 1, ChannelRole.MAIN, SID, frozenset(), False))
    with pytest.raises(LocalProtocolError):
        lb.source.send(Progress(0, 0))


def test_channel_rules() -> None:
    lb = Loopback(ChannelRole.BULK, layout=LAYOUT)
    lb.handshake(SID)
    with pytest.raises(LocalProtocolError):
        lb.source.send(Switchover())
    with pytest.raises(LocalProtocolError):
        lb.dest.send(PageRequest(1, 0, 1))
    # A peer breaking the rule is caught on receipt.
    rogue = Loopback(ChannelRole.MAIN, layout=LAYOUT)
    rogue.handshake(SID)
    frames = rogue.source.send(Switchover())
    lb.dest.receive_data(bytes(frames[0]))
    with pytest.raises(RemoteProtocolError) as exc:
        lb.dest.next_event()
    assert exc.value.code == ErrorCode.UNEXPECTED


def test_clean_eof_and_truncation() -> None:
    lb = Loopback()
    lb.handshake(SID)
    lb.dest.receive_data(b"")
    assert type(lb.dest.next_event()).__name__ == "ConnectionClosed"
    lb2 = Loopback()
    frame = b"".join(
        bytes(b) for b in lb2.source.send(Hello(1, 1, ChannelRole.MAIN, SID, frozenset()))
    )
    lb2.dest.receive_data(frame[:-1])
    assert lb2.dest.next_event() is NEED_DATA
    lb2.dest.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as exc:
        lb2.dest.next_event()
    assert exc.value.code == ErrorCode.TRUNCATED


def test_accepting_destination_adopts_the_announced_channel() -> None:
    for channel in ChannelRole:
        src = Connection(Role.SOURCE, channel, layout=LAYOUT)
        dst = Connection(Role.DESTINATION, None, layout=LAYOUT)
        assert dst.channel is None
        for buf in src.send(Hello(1, 1, channel, SID, frozenset(), False)):
            dst.receive_data(bytes(buf))
        assert type(dst.next_event()) is Hello
        assert dst.channel is channel
    with pytest.raises(ValueError):
        Connection(Role.SOURCE, None)
