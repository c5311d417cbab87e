"""Every message boundary of the switchover, on either side, cut before and after.

The engine's hook (``MIGRATED_FAULT``, grammar: migrated/transport/faults.py) aborts every
connection of the session at the chosen boundary; reconnecting then works.  What must
follow is fixed by the commit point: until the source has sent ``Commit`` every
failure resumes the VM on the source (``send`` exits 1, the destination never runs
the guest); once ``Commit`` went out the source is ``postcopy-paused``, reconnects by
itself and finishes (exit 0, the VM on the destination only).  Two boundaries are in
doubt by construction and may end either way, but always in exactly one place:
``Ready`` written by the destination just before its reset (the source may or may not
read it and commit), and ``Commit`` cut before it leaves (the source may count the
decision or the write as its commit).  "Acted on" is in doubt the same way where the
reaction is a message: ``VmState`` received and acted on may include the
destination's ``Ready``, ``Ready`` received and acted on the source's ``Commit``.
"""

from __future__ import annotations

import pytest

from .faults import (
    GUEST,
    POST_COMMIT,
    SENDER,
    RunWatch,
    expect_aborted,
    expect_completed_on_destination,
    expect_fault_fired,
    fault,
)
from .pair import Pair

pytestmark = [pytest.mark.faults, pytest.mark.kvm, pytest.mark.uffd, pytest.mark.netns]

PRE, POST, EITHER = "before-commit", "after-commit", "in-doubt"


def expected(message: str, side: str, direction: str, action: str) -> str:
    if message in ("Switchover",):
        return PRE
    if message == "VmState":
        return EITHER if (direction, action) == ("recv", "cut-after") else PRE
    if message == "Ready":
        if side == "destination":  # its sender
            return PRE if action == "cut-before" else EITHER
        # Acting on Ready is committing, but the cut may come between processing Ready
        # and writing Commit (then the source never committed): in doubt.
        return PRE if action == "cut-before" else EITHER
    if message == "Commit":
        return EITHER if (side, action) == ("source", "cut-before") else POST
    return POST  # Running


def boundaries() -> list[tuple[str, str, str, str]]:
    out = []
    for message in ("Switchover", "VmState", "Ready", "Commit", "Running"):
        sender = SENDER[message]
        receiver = "destination" if sender == "source" else "source"
        for side, direction in ((sender, "sent"), (receiver, "recv")):
            for action in ("cut-before", "cut-after"):
                out.append((message, side, direction, action))
    return out


@pytest.mark.parametrize(
    "message,side,direction,action",
    boundaries(),
    ids=[f"{m}-{s}-{d}-{a}" for m, s, d, a in boundaries()],
)
def test_switchover_boundary(
    netpair: Pair, message: str, side: str, direction: str, action: str
) -> None:
    env = fault(action, direction, message)
    netpair.start_dest(env=env if side == "destination" else None)
    netpair.start_source(GUEST, env=env if side == "source" else None)
    hooked = netpair.source if side == "source" else netpair.dest
    assert hooked is not None
    outcome = expected(message, side, direction, action)
    with RunWatch(netpair) as watch:
        r = netpair.send("postcopy", "--recovery-timeout", "60", timeout=60)
        if outcome == EITHER:
            outcome = PRE if r.returncode == 1 else POST
        if outcome == PRE:
            assert not POST_COMMIT.intersection(r.states()), r.states()
            expect_aborted(netpair, r, watch, phase="switchover")
        else:
            # Past the commit the link loss pauses both sides; the source reconnects.
            assert "postcopy-paused" in r.states(), (
                f"the source never paused after a cut at {message}: {r.states()}\n" + netpair.logs()
            )
            expect_completed_on_destination(netpair, r, watch)
    expect_fault_fired(hooked)
