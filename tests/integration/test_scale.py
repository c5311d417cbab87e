"""Scale within what CI can afford: the embedded VMM's maximum of 8 vCPUs, each writing
its own slice of RAM, and four migrations on one host at once.  The large sizes (10 GiB,
4 x 1 GiB) are measured by ``bench/scale.py``; these tests prove the same paths complete
and verify."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .pair import Guest, Pair
from .test_migrate_pair import migrated_ok

pytestmark = [pytest.mark.kvm, pytest.mark.uffd]


@pytest.mark.parametrize("mode", ["postcopy", "hybrid"])
def test_eight_vcpus_each_writing_its_slice(pair: Pair, mode: str) -> None:
    guest = Guest(memory_mib=256, vcpus=8, hot_set_mib=2, writes_per_s=20000)
    pair.start(guest)
    src, dst = migrated_ok(pair, mode, guest)
    blocked = dst["blocktime_s_per_vcpu"]
    assert set(blocked) <= {str(i) for i in range(8)}, blocked
    assert all(v >= 0 for v in blocked.values()), blocked
    if mode == "postcopy":
        # Every vCPU writes its own hot pages at once on arrival, none of which is there
        # yet: each one waits for the network at least once, and is accounted apart.
        assert set(blocked) == {str(i) for i in range(8)}, dst
        assert dst["postcopy_requests"] >= 8, dst
    else:
        assert src["precopy_rounds"] >= 1, src
    # All eight keep running and writing on the destination.
    after = pair.status(pair.dst_sock)
    assert after is not None
    assert [v["index"] for v in after["vm"]["vcpus"]] == list(range(8)), after["vm"]


def _result(log: Path) -> dict:
    events = []
    for line in log.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return next((e for e in reversed(events) if e.get("event") == "result"), {})


def test_four_migrations_at_once_on_one_host(workdir: Path) -> None:
    """Four VMs, four receivers, four ``send``s started together: every one completes, its
    source leaves, and every guest verifies where it arrived."""
    guest = Guest(memory_mib=128, vcpus=1, hot_set_mib=8, writes_per_s=20000)
    pairs = []
    for i in range(4):
        d = workdir / f"m{i}"
        d.mkdir()
        pairs.append(Pair(d))
    try:
        for p in pairs:
            p.start_dest()
            p.start_source(guest, wait_ready=False)
        for p in pairs:
            assert p.source is not None
            p.wait_guest_ready(p.src_sock, p.source, 180)
        sends = [p.send_bg("postcopy") for p in pairs]
        deadline = time.monotonic() + 240
        for p, s in zip(pairs, sends, strict=True):
            code = s.wait(max(1.0, deadline - time.monotonic()))
            assert code == 0, f"send {p.workdir.name}: exit {code}\n{p.logs()}"
        for p, s in zip(pairs, sends, strict=True):
            result = _result(s.log)
            assert result.get("status") == "completed", (p.workdir.name, result)
            assert result["stats"]["postcopy_bytes"] > 0, result["stats"]
            assert p.source is not None and p.source.wait(60) == 0, p.logs()
            p.assert_verifies(p.dst_sock, guest.vcpus)
            st = p.status(p.dst_sock)
            assert st is not None and st["migration"]["status"] == "completed", st
    finally:
        for p in pairs:
            p.close()
