"""Signals to either VM process in each phase: SIGKILL, SIGTERM, SIGSTOP/SIGCONT.

Before the commit the source owns the only copy of the VM: losing the destination
leaves it running there (exit 1); losing the source loses the VM, and ``send`` says
the VM process went away (exit 4) instead of claiming it still runs.  SIGTERM before
the commit stops the process only after cancelling the migration; after the commit it
is ignored on both sides.  A stopped process is a silent peer: the heartbeat notices.
After the commit, a dead destination leaves the source paused (exit 3) until the
operator, knowing the destination is gone, resumes it with ``cont --force``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from .faults import (
    GUEST,
    HEARTBEAT,
    LINK_REASONS,
    RunWatch,
    SendProc,
    assert_failure_message,
    expect_aborted,
    expect_completed_on_destination,
    failure_text,
    migration_status,
    settle_destination_after_abort,
    start_send,
    stopped,
    terminate,
    vm_runs,
    wait_bytes,
    wait_status,
    where,
)
from .pair import Pair

pytestmark = [pytest.mark.faults, pytest.mark.kvm, pytest.mark.uffd, pytest.mark.netns]

PRECOPY = ("--max-precopy-rounds", "3", "--precopy-bandwidth", "16")
POSTCOPY = ("--postcopy-bandwidth", "16", "--recovery-timeout", "60")


def in_precopy(pair: Pair) -> SendProc:
    pair.start(GUEST)
    send = start_send(pair, "hybrid", *PRECOPY)
    wait_status(pair, pair.src_sock, "active", procs=[send.proc])
    wait_bytes(pair, send, 8 << 20)
    return send


def in_postcopy(pair: Pair, *extra: str) -> SendProc:
    pair.start(GUEST)
    send = start_send(pair, "postcopy", *POSTCOPY, *extra)
    wait_status(pair, pair.src_sock, "postcopy-active", procs=[send.proc])
    wait_bytes(pair, send, 8 << 20)
    return send


@contextlib.contextmanager
def in_setup(pair: Pair) -> Iterator[SendProc]:
    """A migration held in setup: the destination is stopped (its kernel accepts the
    connection, nobody answers the Hello).  SIGCONT on the way out."""
    pair.start(GUEST)
    assert pair.dest is not None
    with stopped(pair.dest):
        send = start_send(pair, "hybrid", *PRECOPY)
        wait_status(pair, pair.src_sock, "setup", procs=[send.proc])
        time.sleep(0.5)
        yield send


# -- SIGKILL ----------------------------------------------------------------------------


def test_kill_destination_in_setup(netpair: Pair) -> None:
    with RunWatch(netpair) as watch:
        with in_setup(netpair) as send:
            assert netpair.dest is not None
            netpair.dest.kill9()
            r = send.result(30)
        expect_aborted(netpair, r, watch, phase="setup", side="destination")


def test_kill_source_in_setup(netpair: Pair) -> None:
    with RunWatch(netpair) as watch:
        with in_setup(netpair) as send:
            assert netpair.source is not None
            netpair.source.kill9()
            r = send.result(30)
        text = failure_text(r)
        assert r.returncode == 4, f"send exited {r.returncode}, expected 4\n{text}"
        assert "still running on the source" not in text, text
        assert_failure_message(text, phase="setup", side="source",
                               reason=("went away", "closed", "lost", "died", "killed"),
                               next_cmd=("status",))  # fmt: skip
        settle_destination_after_abort(netpair, allow_idle=True)
        watch.assert_destination_never_ran()
        assert where(netpair) == []


def test_kill_destination_in_precopy(netpair: Pair) -> None:
    with RunWatch(netpair) as watch:
        send = in_precopy(netpair)
        assert netpair.dest is not None
        netpair.dest.kill9()
        expect_aborted(netpair, send.result(30), watch, phase="precopy", side="destination")


def test_kill_source_in_precopy(netpair: Pair) -> None:
    """The source process (the VM) dies: nothing can save the VM; ``send`` must say the
    VM process went away, and the destination must not run what it received."""
    with RunWatch(netpair) as watch:
        send = in_precopy(netpair)
        assert netpair.source is not None
        netpair.source.kill9()
        r = send.result(30)
        text = failure_text(r)
        assert r.returncode == 4, f"send exited {r.returncode}, expected 4\n{text}"
        assert "still running on the source" not in text, text
        assert_failure_message(text, phase="precopy", side="source",
                               reason=("went away", "closed", "lost", "died", "killed"),
                               next_cmd=("status",))  # fmt: skip
        settle_destination_after_abort(netpair)
        watch.assert_destination_never_ran()
        assert where(netpair) == []
    assert netpair.dest is not None
    assert "source" in netpair.dest.log.read_text().split('"failed"')[-1], netpair.logs()


def test_kill_destination_in_postcopy_then_cont_force(netpair: Pair) -> None:
    """After the commit the destination dies for good: ``send`` exits 3 after the
    recovery timeout, the source stays paused and refuses a plain ``cont`` (exit 5);
    ``cont --force`` resumes its copy, which verifies."""
    with RunWatch(netpair) as watch:
        send = in_postcopy(netpair, "--recovery-timeout", "2")
        assert netpair.dest is not None and netpair.source is not None
        netpair.dest.kill9()
        r = send.result(30)
        text = failure_text(r)
        assert r.returncode == 3, f"send exited {r.returncode}, expected 3\n{text}"
        assert_failure_message(text, phase="postcopy", side="destination", reason=LINK_REASONS,
                               next_cmd=("recover", "cont"))  # fmt: skip
        assert netpair.source.alive()
        assert migration_status(netpair.src_sock) in ("postcopy-paused", "postcopy-recover")
        c = netpair.cli("cont", "--control", netpair.src_sock, timeout=60)
        assert c.returncode == 5 and "--force" in c.stderr, f"cont: {c.returncode} {c.stderr}"
        assert not vm_runs(netpair, netpair.src_sock)
        c = netpair.cli("cont", "--force", "--control", netpair.src_sock, timeout=60)
        assert c.returncode == 0, f"cont --force: {c.returncode} {c.stderr}"
        assert "destination" in (c.stdout + c.stderr).lower(), "cont --force gave no warning"
        watch.samples.clear()  # the destination is dead: the source copy is the VM now
        time.sleep(0.3)
        assert where(netpair) == ["source"]
        netpair.assert_verifies(netpair.src_sock, GUEST.vcpus)


def test_kill_source_in_postcopy(netpair: Pair) -> None:
    """After the commit the source dies: the destination keeps the VM (paused on the
    pages it lacks) and refuses to stop without --force; ``send`` exits 4."""
    send = in_postcopy(netpair)
    assert netpair.source is not None and netpair.dest is not None
    netpair.source.kill9()
    r = send.result(30)
    text = failure_text(r)
    assert r.returncode == 4, f"send exited {r.returncode}, expected 4\n{text}"
    assert_failure_message(text, phase="postcopy", side="source",
                           reason=("went away", "closed", "lost", "died", "killed"),
                           next_cmd=("status",))  # fmt: skip
    wait_status(netpair, netpair.dst_sock, "postcopy-paused", timeout=15)
    assert vm_runs(netpair, netpair.dst_sock)
    s = netpair.cli("stop", "--control", netpair.dst_sock, timeout=60)
    assert s.returncode != 0 and "--force" in s.stderr, f"stop: {s.returncode} {s.stderr}"
    assert netpair.dest.alive()


# -- SIGTERM ----------------------------------------------------------------------------


def test_sigterm_source_in_setup(netpair: Pair) -> None:
    with RunWatch(netpair) as watch:
        with in_setup(netpair) as send:
            assert netpair.source is not None
            terminate(netpair.source)
            r = send.result(30)
            assert netpair.source.wait(15) is not None
        text = failure_text(r)
        assert r.returncode in (1, 4), f"send exited {r.returncode}\n{text}"
        assert "still running on the source" not in text, f"not true any more: {text}"
        assert_failure_message(text, phase="setup", side="source",
                               reason=("SIGTERM", "stopped", "terminated", "went away"),
                               next_cmd=("status", "run", "send"))  # fmt: skip
        settle_destination_after_abort(netpair, allow_idle=True)
        watch.assert_destination_never_ran()


def test_sigterm_source_in_precopy(netpair: Pair) -> None:
    """Stopping the source before the commit cancels the migration first; what
    ``send`` says must be true: the VM process is going away."""
    with RunWatch(netpair) as watch:
        send = in_precopy(netpair)
        assert netpair.source is not None
        terminate(netpair.source)
        r = send.result(30)
        assert netpair.source.wait(15) is not None
        text = failure_text(r)
        assert r.returncode in (1, 4), f"send exited {r.returncode}\n{text}"
        assert "still running on the source" not in text, f"not true any more: {text}"
        assert_failure_message(text, phase="precopy", side="source",
                               reason=("SIGTERM", "stopped", "terminated", "went away"),
                               next_cmd=("status", "run", "send"))  # fmt: skip
        settle_destination_after_abort(netpair)
        watch.assert_destination_never_ran()


def test_sigterm_destination_in_precopy(netpair: Pair) -> None:
    with RunWatch(netpair) as watch:
        send = in_precopy(netpair)
        assert netpair.dest is not None
        terminate(netpair.dest)
        expect_aborted(netpair, send.result(30), watch, phase="precopy", side="destination",
                       reason=(*LINK_REASONS, "SIGTERM", "stopped"))  # fmt: skip


@pytest.mark.parametrize("side", ["source", "destination"])
def test_sigterm_in_postcopy_is_ignored(netpair: Pair, side: str) -> None:
    with RunWatch(netpair) as watch:
        send = in_postcopy(netpair)
        proc = netpair.source if side == "source" else netpair.dest
        assert proc is not None
        terminate(proc)
        time.sleep(0.5)
        assert proc.alive(), f"the {side} left on SIGTERM while the VM was split"
        expect_completed_on_destination(netpair, send.result(), watch)
    assert "ignoring SIGTERM" in proc.log.read_text(), proc.log.read_text()[-2000:]


# -- SIGSTOP / SIGCONT ------------------------------------------------------------------


def test_sigstop_destination_in_setup(netpair: Pair) -> None:
    """A destination that accepts the connection and never answers (stopped)."""
    netpair.start(GUEST)
    assert netpair.dest is not None
    with RunWatch(netpair) as watch:
        with stopped(netpair.dest):
            r = netpair.send("hybrid", *PRECOPY, timeout=60)
        expect_aborted(netpair, r, watch, phase="setup", side="destination",
                       reason=("no answer", "timed out", "timeout", "heartbeat", "silent"),
                       allow_idle_destination=True)  # fmt: skip


def test_sigstop_source_in_precopy(netpair: Pair) -> None:
    """The source is frozen: the destination hears no heartbeat and gives up (it
    never ran the guest); the source, thawed, resumes nothing it had not paused and
    reports the failed migration."""
    with RunWatch(netpair) as watch:
        send = in_precopy(netpair)
        assert netpair.source is not None and netpair.dest is not None
        with stopped(netpair.source):
            netpair.wait_for(
                lambda: (
                    (not netpair.dest.alive())  # type: ignore[union-attr]
                    or migration_status(netpair.dst_sock) == "failed"
                ),
                20,
                "the destination to give up on a silent source",
            )
        assert "no heartbeat from the source for" in netpair.dest.log.read_text()
        expect_aborted(netpair, send.result(30), watch, phase="precopy")


def test_sigstop_destination_in_precopy(netpair: Pair) -> None:
    with RunWatch(netpair) as watch:
        send = in_precopy(netpair)
        assert netpair.dest is not None
        with stopped(netpair.dest):
            r = send.result(30)
        assert HEARTBEAT.search(r.stderr), r.stderr
        expect_aborted(netpair, r, watch, phase="precopy", side="destination",
                       reason=("heartbeat",))  # fmt: skip


@pytest.mark.parametrize("side", ["source", "destination"])
def test_sigstop_in_postcopy_recovers(netpair: Pair, side: str) -> None:
    """Either side frozen for 7 s in postcopy: the other pauses (heartbeat), and once
    thawed the migration recovers and finishes."""
    with RunWatch(netpair) as watch:
        send = in_postcopy(netpair)
        proc = netpair.source if side == "source" else netpair.dest
        other = netpair.dst_sock if side == "source" else netpair.src_sock
        assert proc is not None
        with stopped(proc):
            wait_status(netpair, other, "postcopy-paused", timeout=15)
            time.sleep(1.0)
        r = send.result()
        assert "postcopy-paused" in r.states(), r.states()
        expect_completed_on_destination(netpair, r, watch)
