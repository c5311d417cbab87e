"""An outage longer than ``--recovery-timeout``: recovery never gives up.

``send`` stops waiting after ``--recovery-timeout`` and exits 3 naming the command that
resumes; the source VM process stays ``postcopy-paused`` with its copy of the memory and
keeps retrying with backoff; the destination waits too.  When the destination can be
reached again the migration finishes: by ``migrated recover --to``, by running
``migrated send`` again, or by the source's own retries.

The destination listens on every address of its namespace; the address the migration
started on refuses connections (TCP reset) for the whole test, so the source's own
retries cannot finish it behind the command under test.  The second address is the
"new address" of ``recover --to`` / ``send --to``.
"""

from __future__ import annotations

import time

import pytest

from .faults import (
    GUEST,
    BlackHole,
    RunWatch,
    SendProc,
    add_dest_address,
    assert_both_paused,
    assert_failure_message,
    expect_completed_on_destination,
    failure_text,
    migration_status,
    start_send,
    vm_runs,
    wait_bytes,
    wait_status,
)
from .pair import Pair, SendResult

pytestmark = [pytest.mark.faults, pytest.mark.kvm, pytest.mark.uffd, pytest.mark.netns]

ALT_IP = "10.77.0.3"
RECOVERY_TIMEOUT_S = 2


def outage_past_the_timeout(pair: Pair) -> tuple[SendProc, BlackHole, SendResult]:
    """Postcopy, then the destination's address refuses everything and the open
    connections are aborted.  Returns once ``send`` has exited 3 and another second
    has passed, with both sides still paused."""
    net = pair.net
    assert net is not None
    pair.start_dest(listen_host="0.0.0.0")
    add_dest_address(net, ALT_IP)
    pair.start_source(GUEST)
    send = start_send(pair, "postcopy", "--postcopy-bandwidth", "16",
                      "--recovery-timeout", str(RECOVERY_TIMEOUT_S))  # fmt: skip
    wait_status(pair, pair.src_sock, "postcopy-active", procs=[send.proc])
    wait_bytes(pair, send, 8 << 20)
    refuse = BlackHole(net, reject=True)
    refuse.add()
    net.abort_connections(pair.dest_port)
    assert_both_paused(pair, 15)
    t0 = time.monotonic()
    r = send.result(RECOVERY_TIMEOUT_S + 30)
    waited = time.monotonic() - t0
    text = failure_text(r)
    assert r.returncode == 3, f"send exited {r.returncode}, expected 3\n{text}\n{pair.logs()}"
    assert waited < RECOVERY_TIMEOUT_S + 10, f"send waited {waited:.1f} s"
    time.sleep(1.0)
    # Past the timeout nothing gave up: both sides wait, the guest runs there.
    assert pair.source is not None and pair.source.alive(), pair.logs()
    assert pair.dest is not None and pair.dest.alive(), pair.logs()
    for sock in (pair.src_sock, pair.dst_sock):
        assert migration_status(sock) in ("postcopy-paused", "postcopy-recover"), pair.logs()
    assert vm_runs(pair, pair.dst_sock)
    return send, refuse, r


def check_exit_3_message(r: SendResult) -> None:
    """Exit 3 names the phase, a reason and the command that resumes."""
    assert_failure_message(failure_text(r), phase="postcopy", side=None,
                           reason=("reset", "refused", "lost", "closed", "abort"),
                           next_cmd=("recover",))  # fmt: skip


def test_recover_to_new_address_after_the_timeout(netpair: Pair) -> None:
    with RunWatch(netpair) as watch:
        _send, _refuse, r = outage_past_the_timeout(netpair)
        check_exit_3_message(r)
        rc = netpair.cli("recover", "--control", netpair.src_sock, "--to",
                         f"{ALT_IP}:{netpair.dest_port}", timeout=60)  # fmt: skip
        assert rc.returncode == 0, f"recover: {rc.returncode} {rc.stderr}"
        assert netpair.source is not None
        assert netpair.source.wait(60) == 0, netpair.logs()
        wait_status(netpair, netpair.dst_sock, "completed", timeout=30)
        netpair.assert_verifies(netpair.dst_sock, GUEST.vcpus)
        watch.assert_no_second_copy()
    check_exit_3_message(r)


def test_send_again_resumes_after_the_timeout(netpair: Pair) -> None:
    with RunWatch(netpair) as watch:
        outage_past_the_timeout(netpair)
        args = netpair.send_args("postcopy", to=f"{ALT_IP}:{netpair.dest_port}")
        r = SendResult.parse(netpair.cli(*args, timeout=120))
        expect_completed_on_destination(netpair, r, watch)


def test_source_keeps_retrying_after_the_timeout(netpair: Pair) -> None:
    """No command at all: once the address answers again, the source's own retries
    (backing off up to a few seconds) finish the migration."""
    with RunWatch(netpair) as watch:
        _send, refuse, r = outage_past_the_timeout(netpair)
        refuse.remove()
        assert netpair.source is not None
        assert netpair.source.wait(30) == 0, netpair.logs()
        wait_status(netpair, netpair.dst_sock, "completed", timeout=30)
        netpair.assert_verifies(netpair.dst_sock, GUEST.vcpus)
        watch.assert_no_second_copy()
    check_exit_3_message(r)
