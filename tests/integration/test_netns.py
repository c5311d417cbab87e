"""Migrations between two network namespaces joined by a veth pair: each side has its
own address, the link can be throttled (``tbf``), cut (``ip link set down``) and its
connections aborted (``ss -K``).  Control sockets are Unix files, reachable from here.

Throttling uses ``tbf`` on the source's veth (and the ``--*-bandwidth`` flags too).
"""

from __future__ import annotations

import contextlib
import json

import pytest

from .pair import Guest, Pair, Proc

pytestmark = [pytest.mark.kvm, pytest.mark.uffd, pytest.mark.netns]

RATE_MB_S = 40  # ~13 s of postcopy for 512 MiB


def events(proc: Proc) -> list[dict]:
    out = []
    for line in proc.log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def wait_source_state(pair: Pair, state: str, proc: Proc, timeout: float = 60) -> None:
    pair.wait_for(
        lambda: pair.migration_status(pair.src_sock) == state,
        timeout,
        f"the source to report {state}",
        procs=[proc],
        interval=0.05,
    )


def wait_both_paused(pair: Pair, timeout: float) -> None:
    pair.wait_for(
        lambda: (
            pair.migration_status(pair.src_sock) == "postcopy-paused"
            and pair.migration_status(pair.dst_sock) == "postcopy-paused"
        ),
        timeout,
        "both sides to report postcopy-paused",
    )


def test_postcopy_across_namespaces(netpair: Pair) -> None:
    guest = Guest(memory_mib=256, vcpus=1)
    netpair.start(guest)
    assert netpair.dest_addr.startswith("10.77.0.2:")
    assert netpair.net is not None
    tx0 = netpair.net.tx_bytes("source")
    r = netpair.send("postcopy")
    assert r.returncode == 0, r.stderr + netpair.logs()
    assert netpair.source is not None and netpair.source.wait(60) == 0
    netpair.assert_verifies(netpair.dst_sock, 1)
    st = netpair.status(netpair.dst_sock)
    assert st is not None and st["migration"]["status"] == "completed"
    assert st["migration"]["postcopy_requests"] > 0
    # The guest's memory really crossed the veth (not loopback).
    assert netpair.net.tx_bytes("source") - tx0 > 200 << 20


def test_cancel_during_precopy(netpair: Pair) -> None:
    assert netpair.net is not None
    netpair.start(Guest(memory_mib=256, vcpus=1))
    netpair.net.rate_limit(50)
    send = netpair.send_bg("hybrid", "--precopy-bandwidth", "50")
    wait_source_state(netpair, "active", send)
    netpair.wait_for(
        lambda: (
            ((netpair.status(netpair.src_sock) or {}).get("migration") or {}).get(
                "transferred_bytes", 0
            )
            > 8 << 20
        ),
        30,
        "precopy to move some pages",
        procs=[send],
    )
    r = netpair.cli("cancel", "--control", netpair.src_sock)
    assert r.returncode == 0, r.stderr
    assert send.wait(60) == 1, netpair.logs()
    st = netpair.status(netpair.src_sock)
    assert st is not None and st["migration"]["status"] == "cancelled", st
    assert st["vm"]["runstate"] == "running"
    netpair.assert_verifies(netpair.src_sock, 1)
    # The destination never ran the guest: it gives up and leaves.
    assert netpair.dest is not None
    assert netpair.dest.wait(30) == 1
    # (Its stated reason may be "the source went away": Cancel travels on MAIN behind the
    # queued pages, the URGENT channel's close can arrive first.)
    assert '"status": "failed"' in netpair.dest.log.read_text()


def test_destination_killed_during_precopy(netpair: Pair) -> None:
    assert netpair.net is not None and netpair.dest is None
    netpair.start(Guest(memory_mib=256, vcpus=1))
    netpair.net.rate_limit(50)
    send = netpair.send_bg("hybrid", "--precopy-bandwidth", "50")
    wait_source_state(netpair, "active", send)
    assert netpair.dest is not None
    netpair.dest.kill9()
    assert send.wait(60) == 1, netpair.logs()
    st = netpair.status(netpair.src_sock)
    assert st is not None and st["vm"]["runstate"] == "running", st
    assert st["migration"]["status"] == "failed", st["migration"]
    netpair.assert_verifies(netpair.src_sock, 1)


def test_link_failure_in_postcopy_recovers(netpair: Pair) -> None:
    """The proof of "no VM lost on a link failure": the link goes down and both kernels
    drop the connections in the middle of postcopy; both sides pause, the guest keeps
    living on the destination, the source reconnects by itself once the link is back,
    and every page of the guest is right."""
    net = netpair.net
    assert net is not None
    guest = Guest(memory_mib=512, vcpus=1)
    netpair.start(guest)
    net.rate_limit(RATE_MB_S)
    # The bare control client (the CLI path has its own test below).
    mig = netpair.migrate_raw_bg("postcopy", postcopy_bandwidth=RATE_MB_S * 10**6)
    wait_source_state(netpair, "postcopy-active", mig)
    net.link(False)
    net.abort_connections(netpair.dest_port)
    wait_both_paused(netpair, 15)
    assert netpair.dest is not None and netpair.dest.alive()
    assert netpair.source is not None and netpair.source.alive()
    st = netpair.status(netpair.dst_sock)
    assert st is not None and st["vm"]["runstate"] == "running", st and st["vm"]
    # Neither side may be stopped now: the VM is split between them.
    r = netpair.cli("stop", "--control", netpair.src_sock)
    assert r.returncode == 5 and "the VM is split" in r.stderr, r.stderr
    net.link(True)
    assert mig.wait(180) == 0, netpair.logs()
    evs = events(mig)
    kinds = [e.get("event") for e in evs]
    assert "link-lost" in kinds and "recovered" in kinds, kinds
    result = next(e["result"] for e in evs if "result" in e)
    assert result["status"] == "completed"
    assert result["stats"]["recoveries"] >= 1
    assert netpair.source.wait(60) == 0
    st = netpair.status(netpair.dst_sock)
    assert st is not None, netpair.logs()
    assert st["migration"]["status"] == "completed"
    assert st["migration"]["recoveries"] >= 1
    assert st["vm"]["runstate"] == "running"
    netpair.assert_verifies(netpair.dst_sock, guest.vcpus)


def test_send_cli_survives_link_loss(netpair: Pair) -> None:
    """Regression: `migrated send` took the link-lost event (it has an "error" field) for
    an error reply and crashed with exit 1, "VM still on the source", during postcopy."""
    net = netpair.net
    assert net is not None
    netpair.start(Guest(memory_mib=256, vcpus=1))
    net.rate_limit(RATE_MB_S)
    send = netpair.send_bg("postcopy", "--postcopy-bandwidth", str(RATE_MB_S))
    wait_source_state(netpair, "postcopy-active", send)
    net.link(False)
    net.abort_connections(netpair.dest_port)
    wait_both_paused(netpair, 15)
    net.link(True)
    code = send.wait(180)
    assert "Traceback" not in send.log.read_text(), send.log.read_text()[-1500:]
    assert code == 0


def test_black_hole_link_detected(netpair: Pair) -> None:
    """A link that silently drops everything (no RST, no FIN): the heartbeat timeout must
    pause both sides (regression: postcopy stayed 'active' until TCP gave up), and the
    migration must recover once the link is back."""
    net = netpair.net
    assert net is not None
    netpair.start(Guest(memory_mib=256, vcpus=1))
    net.rate_limit(RATE_MB_S)
    mig = netpair.migrate_raw_bg("postcopy")
    wait_source_state(netpair, "postcopy-active", mig)
    net.link(False)
    try:
        # generous: the sides abort a MAIN channel silent for 5 s
        wait_both_paused(netpair, 20)
        assert netpair.dest is not None and netpair.dest.alive()
    finally:
        net.link(True)
    assert mig.wait(180) == 0, netpair.logs()
    assert netpair.migration_status(netpair.dst_sock) == "completed"
    netpair.assert_verifies(netpair.dst_sock, 1)


def test_source_killed_in_postcopy(netpair: Pair) -> None:
    net = netpair.net
    assert net is not None
    netpair.start(Guest(memory_mib=512, vcpus=1))
    net.rate_limit(RATE_MB_S)
    send = netpair.send_bg("postcopy", "--postcopy-bandwidth", str(RATE_MB_S))
    wait_source_state(netpair, "postcopy-active", send)
    assert netpair.source is not None and netpair.dest is not None
    netpair.source.kill9()
    netpair.wait_for(
        lambda: netpair.migration_status(netpair.dst_sock) == "postcopy-paused",
        15,
        "the destination to report postcopy-paused",
        procs=[netpair.dest],
    )
    # The destination holds the only running copy of the guest: it is not killed and
    # refuses to stop without --force.
    assert netpair.dest.alive()
    r = netpair.cli("stop", "--control", netpair.dst_sock)
    assert r.returncode == 5, f"{r.returncode}: {r.stderr}"
    assert "postcopy is in progress" in r.stderr, r.stderr
    assert netpair.dest.alive()
    st = netpair.status(netpair.dst_sock)
    assert st is not None and st["migration"]["status"] == "postcopy-paused", st
    assert st["vm"]["runstate"] == "running", st["vm"]
    r = netpair.cli("stop", "--force", "--control", netpair.dst_sock)
    assert r.returncode == 0, r.stderr


def test_destination_status_shows_vm_during_postcopy(netpair: Pair) -> None:
    """Regression: `status` on the destination said runstate 'none' until completion."""
    net = netpair.net
    assert net is not None
    netpair.start(Guest(memory_mib=256, vcpus=1))
    net.rate_limit(RATE_MB_S)
    mig = netpair.migrate_raw_bg("postcopy")
    wait_source_state(netpair, "postcopy-active", mig)
    st = netpair.status(netpair.dst_sock)
    assert st is not None and st["migration"]["status"] == "postcopy-active", st
    assert st["vm"]["runstate"] == "running", st["vm"]


def test_destination_killed_in_postcopy_exit_3_and_source_stays_paused(netpair: Pair) -> None:
    """The other side of the point of no return: once the guest ran on the destination,
    losing the destination for good ends `send` with exit 3 (postcopy interrupted), the
    source keeps its paused copy and refuses to run it again."""
    net = netpair.net
    assert net is not None
    netpair.start(Guest(memory_mib=512, vcpus=1))
    net.rate_limit(RATE_MB_S)
    send = netpair.send_bg(
        "postcopy", "--postcopy-bandwidth", str(RATE_MB_S), "--recovery-timeout", "3"
    )
    wait_source_state(netpair, "postcopy-active", send)
    assert netpair.dest is not None and netpair.source is not None
    netpair.dest.kill9()
    assert send.wait(60) == 3, netpair.logs()
    assert "do NOT restart" in send.log.read_text(), send.log.read_text()[-2000:]
    assert netpair.source.alive()
    st = netpair.status(netpair.src_sock)
    assert st is not None and st["vm"]["runstate"] == "paused", st
    r = netpair.cli("cont", "--control", netpair.src_sock)
    assert r.returncode == 5, f"{r.returncode}: {r.stderr}"
    assert "must not run here while the destination may run it" in r.stderr, r.stderr
    assert "cont --force" in r.stderr, r.stderr
