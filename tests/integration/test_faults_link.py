"""The link fails: cut at a message boundary, taken down, or turned into a black hole,
in setup, in each precopy round, in postcopy and during recovery.

Before the commit the VM keeps running on the source (``send`` exits 1 naming phase,
side, reason and ``migrated send``); after it both sides pause and the migration
finishes once the link is back, by itself or with ``migrated recover``.  A link that
goes silent is declared lost by the heartbeat ("no heartbeat from the destination for
5.2 s").  Outages longer than ``--recovery-timeout`` are in test_faults_recovery.py.
"""

from __future__ import annotations

import time

import pytest

from .faults import (
    GUEST,
    HEARTBEAT,
    BlackHole,
    RunWatch,
    SendProc,
    assert_both_paused,
    cut,
    expect_aborted,
    expect_completed_on_destination,
    expect_fault_fired,
    fault,
    link_down,
    link_up,
    quick_status,
    start_send,
    vm_runs,
    wait_bytes,
    wait_status,
)
from .pair import Pair

pytestmark = [pytest.mark.faults, pytest.mark.kvm, pytest.mark.uffd, pytest.mark.netns]

#: 64 MiB at 16 MB/s: the first precopy round lasts about 4 s.
PRECOPY = ("--max-precopy-rounds", "3", "--precopy-bandwidth", "16")
#: 64 MiB pushed at 16 MB/s: postcopy lasts about 4 s.
POSTCOPY = ("--postcopy-bandwidth", "16", "--recovery-timeout", "60")


def said_by_source(pair: Pair, send: SendProc) -> str:
    """Everything the source side said: its VM process's log and ``send``'s output."""
    assert pair.source is not None
    return pair.source.log.read_text() + send.proc.log.read_text() + send.err.read_text()


def retry_succeeds(pair: Pair) -> None:
    """After a failure before the commit nothing changed: the same VM migrates."""
    assert pair.dest is not None
    if not pair.dest.alive() or quick_status(pair.dst_sock) is None:
        pair.start_dest()
    r = pair.send("postcopy", timeout=120)
    assert r.returncode == 0, r.stderr + pair.logs()
    pair.assert_verifies(pair.dst_sock, GUEST.vcpus)


# -- setup ------------------------------------------------------------------------------

SETUP_CUTS = [
    ("source", "sent", "Setup", "cut-before"),
    ("destination", "recv", "Setup", "cut-after"),
    ("destination", "sent", "SetupAck", "cut-after"),
]
#: A cut after Setup was acted on (SetupAck sent) or after SetupAck reached the
#: source falls on the boundary: the source may already be in precopy.
SETUP_PHASES = {"cut-before": "setup", "cut-after": ("setup", "precopy")}


@pytest.mark.parametrize("side,direction,message,action", SETUP_CUTS,
                         ids=["-".join(c) for c in SETUP_CUTS])  # fmt: skip
def test_cut_in_setup(netpair: Pair, side: str, direction: str, message: str, action: str) -> None:
    env = fault(action, direction, message)
    netpair.start_dest(env=env if side == "destination" else None)
    netpair.start_source(GUEST, env=env if side == "source" else None)
    with RunWatch(netpair) as watch:
        r = netpair.send("hybrid", *PRECOPY, timeout=120)
        expect_aborted(netpair, r, watch, phase=SETUP_PHASES[action],
                       allow_idle_destination=True)  # fmt: skip
    expect_fault_fired(netpair.source if side == "source" else netpair.dest)  # type: ignore[arg-type]
    retry_succeeds(netpair)


def test_black_hole_in_setup(netpair: Pair) -> None:
    """The destination's address drops everything: the connection never opens."""
    assert netpair.net is not None
    netpair.start(GUEST)
    with RunWatch(netpair) as watch, BlackHole(netpair.net):
        r = netpair.send("hybrid", *PRECOPY, timeout=120)
        expect_aborted(
            netpair, r, watch, phase="setup", side="destination",
            reason=("timed out", "timeout", "no answer", "heartbeat"),
            allow_idle_destination=True,
        )  # fmt: skip
    retry_succeeds(netpair)


# -- precopy ----------------------------------------------------------------------------

PRECOPY_CUTS = [
    ("source", "sent", "PrecopyRoundEnd", "cut-after", 1),
    ("destination", "recv", "PrecopyRoundEnd", "cut-before", 2),
    ("destination", "sent", "PrecopyRoundAck", "cut-after", 1),
]


@pytest.mark.parametrize(
    "side,direction,message,action,n",
    PRECOPY_CUTS,
    ids=[f"{c[0]}-{c[1]}-{c[2]}{c[4]}-{c[3]}" for c in PRECOPY_CUTS],
)
def test_cut_in_precopy_round(
    netpair: Pair, side: str, direction: str, message: str, action: str, n: int
) -> None:
    env = fault(action, direction, message, n)
    netpair.start_dest(env=env if side == "destination" else None)
    netpair.start_source(GUEST, env=env if side == "source" else None)
    with RunWatch(netpair) as watch:
        r = netpair.send("hybrid", "--max-precopy-rounds", "3", timeout=120)
        expect_aborted(netpair, r, watch, phase="precopy")
    expect_fault_fired(netpair.source if side == "source" else netpair.dest)  # type: ignore[arg-type]


def test_link_down_in_precopy(netpair: Pair) -> None:
    """The veth goes down in the first round: no reset, only silence; the heartbeat
    notices within seconds and the VM keeps running on the source."""
    assert netpair.net is not None
    netpair.start(GUEST)
    with RunWatch(netpair) as watch:
        send = start_send(netpair, "hybrid", *PRECOPY)
        wait_bytes(netpair, send, 8 << 20)
        link_down(netpair.net)
        r = send.result(30)
        assert HEARTBEAT.search(r.stderr), r.stderr
        link_up(netpair.net)
        expect_aborted(netpair, r, watch, phase="precopy", side="destination",
                       reason=("heartbeat",))  # fmt: skip
    assert netpair.dest is not None
    assert "no heartbeat from the source for" in netpair.dest.log.read_text(), netpair.logs()


def test_black_hole_in_second_precopy_round(netpair: Pair) -> None:
    assert netpair.net is not None
    netpair.start(GUEST)
    with RunWatch(netpair) as watch:
        send = start_send(netpair, "hybrid", *PRECOPY)
        netpair.wait_for(
            lambda: (
                ((quick_status(netpair.src_sock) or {}).get("migration") or {}).get(
                    "precopy_rounds", 0
                )
                >= 1
            ),
            30,
            "the first precopy round to end",
            procs=[send.proc],
            interval=0.05,
        )
        with BlackHole(netpair.net):
            r = send.result(30)
        assert HEARTBEAT.search(r.stderr), r.stderr
        expect_aborted(netpair, r, watch, phase="precopy", side="destination",
                       reason=("heartbeat",))  # fmt: skip


# -- postcopy ---------------------------------------------------------------------------


def start_postcopy(pair: Pair, *extra: str) -> SendProc:
    pair.start(GUEST)
    send = start_send(pair, "postcopy", *POSTCOPY, *extra)
    wait_status(pair, pair.src_sock, "postcopy-active", procs=[send.proc])
    wait_bytes(pair, send, 8 << 20)
    return send


def check_split_commands_refused(pair: Pair) -> None:
    """While the VM is split: the destination runs it, nothing on the source may
    resume, cancel or stop it (exit 5: not valid in this state)."""
    assert vm_runs(pair, pair.dst_sock), pair.logs()
    for cmd in ("cont", "cancel"):
        r = pair.cli(cmd, "--control", pair.src_sock, timeout=60)
        assert r.returncode == 5, f"{cmd} while split: exit {r.returncode}: {r.stderr}"
    r = pair.cli("stop", "--control", pair.src_sock, timeout=60)
    assert r.returncode != 0 and "--force" in r.stderr, f"stop: {r.returncode} {r.stderr}"
    assert pair.source is not None and pair.source.alive()


def test_link_cut_in_postcopy_recovers(netpair: Pair) -> None:
    assert netpair.net is not None
    with RunWatch(netpair) as watch:
        send = start_postcopy(netpair)
        cut(netpair.net, netpair.dest_port)
        assert_both_paused(netpair, 15)
        check_split_commands_refused(netpair)
        link_up(netpair.net)
        r = send.result()
        assert "postcopy-paused" in r.states(), r.states()
        expect_completed_on_destination(netpair, r, watch)


def test_link_down_in_postcopy_heartbeat(netpair: Pair) -> None:
    """Silence (no reset): both sides declare the link lost by heartbeat, say so,
    and finish once it is back."""
    assert netpair.net is not None
    with RunWatch(netpair) as watch:
        send = start_postcopy(netpair)
        link_down(netpair.net)
        assert_both_paused(netpair, 20)
        assert HEARTBEAT.search(said_by_source(netpair, send)), "no heartbeat loss reported"
        assert netpair.dest is not None
        assert "no heartbeat from the source for" in netpair.dest.log.read_text()
        link_up(netpair.net)
        expect_completed_on_destination(netpair, send.result(), watch)


def test_black_hole_in_postcopy(netpair: Pair) -> None:
    assert netpair.net is not None
    with RunWatch(netpair) as watch:
        send = start_postcopy(netpair)
        with BlackHole(netpair.net):
            assert_both_paused(netpair, 20)
            assert vm_runs(netpair, netpair.dst_sock)
        assert HEARTBEAT.search(said_by_source(netpair, send)), "no heartbeat loss reported"
        expect_completed_on_destination(netpair, send.result(), watch)


# -- during recovery --------------------------------------------------------------------


def test_second_cut_during_recovery(netpair: Pair) -> None:
    """The link is cut in postcopy; the first recovery is cut again as soon as the
    source receives the destination's bitmap; the next one finishes."""
    assert netpair.net is not None
    netpair.start_dest()
    netpair.start_source(GUEST, env=fault("cut-after", "recv", "ReceivedBitmap"))
    with RunWatch(netpair) as watch:
        send = start_send(netpair, "postcopy", *POSTCOPY)
        wait_status(netpair, netpair.src_sock, "postcopy-active", procs=[send.proc])
        wait_bytes(netpair, send, 8 << 20)
        cut(netpair.net, netpair.dest_port)
        assert_both_paused(netpair, 15)
        link_up(netpair.net)
        r = send.result()
        expect_completed_on_destination(netpair, r, watch)
    # The hook fires at the first ReceivedBitmap, which only a recovery sends: the
    # second failure happened during the recovery, and the migration still finished.
    assert netpair.source is not None
    expect_fault_fired(netpair.source)


def test_black_hole_during_recovery(netpair: Pair) -> None:
    """The link comes back as a black hole: every reconnection attempt goes
    unanswered, both sides stay paused (the guest still runs on the destination),
    and ``migrated recover`` finishes once the black hole is gone."""
    assert netpair.net is not None
    with RunWatch(netpair) as watch:
        send = start_postcopy(netpair)
        cut(netpair.net, netpair.dest_port)
        assert_both_paused(netpair, 15)
        with BlackHole(netpair.net):
            link_up(netpair.net)
            time.sleep(3)  # reconnection attempts time out into the black hole
            for sock in (netpair.src_sock, netpair.dst_sock):
                st = (quick_status(sock) or {}).get("migration") or {}
                assert st.get("status") in ("postcopy-paused", "postcopy-recover"), st
            assert vm_runs(netpair, netpair.dst_sock)
        r = netpair.cli("recover", "--control", netpair.src_sock, timeout=60)
        assert r.returncode == 0, f"recover: {r.returncode} {r.stderr}"
        expect_completed_on_destination(netpair, send.result(), watch)
