"""Live migration between two real VM processes over real TCP (loopback).

``migrated run`` hosts a memstress guest on /dev/kvm, ``migrated recv`` receives it and
serves its page faults with userfaultfd, ``migrated send`` drives the migration.  The
guest checks every page against its expected pattern (``migrated verify``).
"""

from __future__ import annotations

import pytest

from .pair import Guest, Pair, SendResult

pytestmark = [pytest.mark.kvm, pytest.mark.uffd]


def migrated_ok(pair: Pair, mode: str, guest: Guest, *extra: str) -> tuple[dict, dict]:
    """Migrate, check everything that must hold after any completed migration, and
    return (source stats, destination stats)."""
    r = pair.send(mode, *extra)
    assert r.returncode == 0, f"send exit {r.returncode}\n{r.stderr}\n{r.stdout[-2000:]}\n" + (
        pair.logs()
    )
    assert r.result.get("status") == "completed", r.result
    src = r.result["stats"]
    assert src["status"] == "completed"
    assert src["ram_bytes"] == guest.memory_mib << 20
    assert "completed" in r.states()

    # The source released the VM and left by itself, successfully.
    assert pair.source is not None
    assert pair.source.wait(60) == 0, pair.logs()

    # The destination runs the guest, and every page has its expected content.
    pair.assert_verifies(pair.dst_sock, guest.vcpus)
    st = pair.status(pair.dst_sock)
    assert st is not None, pair.logs()
    assert st["vm"]["runstate"] == "running", st["vm"]
    assert len(st["vm"]["vcpus"]) == guest.vcpus
    assert all(v["runstate"] == "running" for v in st["vm"]["vcpus"]), st["vm"]
    dst = st["migration"]
    assert dst["role"] == "destination"
    assert dst["status"] == "completed", dst
    assert dst["mode"] == mode
    assert dst["total_pages"] == src["total_pages"]
    assert pair.dest is not None and pair.dest.alive()
    return src, dst


def test_postcopy_1vcpu_256mib(pair: Pair) -> None:
    guest = Guest(memory_mib=256, vcpus=1)
    pair.start(guest)
    src, dst = migrated_ok(pair, "postcopy", guest, "--checksum")
    assert src["precopy_rounds"] == 0
    assert src["push_channel"] == "bulk"
    # The guest ran on the destination before its memory was there: real faults,
    # served over the network.
    assert dst["postcopy_requests"] > 0, dst
    assert dst["fault_latency"]["count"] > 0
    assert src["postcopy_bytes"] > 0


def test_postcopy_push_on_main_without_bulk_channel(pair: Pair) -> None:
    """The push path for destinations that refuse a BULK connection."""
    guest = Guest(memory_mib=256, vcpus=1)
    pair.start(guest)
    src, dst = migrated_ok(pair, "postcopy", guest, "--no-bulk-channel")
    assert src["push_channel"] == "main"
    assert dst["postcopy_bytes"] > 0


def test_hybrid_2vcpus_512mib_writing(pair: Pair) -> None:
    guest = Guest(memory_mib=512, vcpus=2, hot_set_mib=64, writes_per_s=20000)
    pair.start(guest)
    src, dst = migrated_ok(pair, "hybrid", guest)
    assert src["precopy_rounds"] >= 1, src
    assert dst["precopy_rounds"] >= 1, dst
    assert src["precopy_bytes"] > 0
    # The writer kept pages dirty to the end: hybrid really went to postcopy for them,
    # and every page the destination asked for was answered.
    assert src["postcopy_bytes"] > 0, src
    assert dst["postcopy_requests"] == 0 or dst["fault_latency"]["count"] > 0, dst
    # The guest kept writing while it moved and keeps writing on the destination.
    after = pair.status(pair.dst_sock)
    assert after is not None
    writes = [v["writes"] for v in after["vm"]["vcpus"]]
    assert all(w is not None and w > 0 for w in writes), after["vm"]


def test_precopy(pair: Pair) -> None:
    guest = Guest(memory_mib=256, vcpus=1)
    pair.start(guest)
    src, dst = migrated_ok(pair, "precopy", guest)
    assert src["precopy_rounds"] >= 1
    # Classic precopy: everything arrived before the guest ran there.
    assert dst["postcopy_requests"] == 0, dst
    assert src["postcopy_bytes"] == 0, src


def test_zero_pages_half_filled_guest(pair: Pair) -> None:
    guest = Guest(memory_mib=256, vcpus=1, fill_percent=50)
    pair.start(guest)
    src, dst = migrated_ok(pair, "hybrid", guest)
    total = src["total_pages"]
    # Half of the guest was never written: those pages travel as zero runs.
    assert src["zero_pages"] > 0.3 * total, src
    assert dst["zero_pages"] > 0.3 * total, dst
    assert src["normal_pages"] > 0.3 * total
    # Zero runs carry no page data: well under the whole RAM crossed the wire.
    assert src["transferred_bytes"] < 0.8 * src["ram_bytes"], src


@pytest.mark.slow
def test_postcopy_2gib_2vcpus(pair: Pair) -> None:
    guest = Guest(memory_mib=2048, vcpus=2, hot_set_mib=64)
    pair.start_dest()
    pair.start_source(guest, timeout=240)
    _src, dst = migrated_ok(pair, "postcopy", guest)
    assert dst["postcopy_requests"] > 0, dst
    assert dst["ram_bytes"] == 2048 << 20


def test_hybrid_with_checksum_while_guest_writes(pair: Pair) -> None:
    """Regression: the source used to checksum live guest RAM and queue a zero-copy view
    of it, so a page the guest changed before it left failed the xxh3 check."""
    guest = Guest(memory_mib=256, vcpus=2, hot_set_mib=64, writes_per_s=20000)
    pair.start(guest)
    src, _dst = migrated_ok(pair, "hybrid", guest, "--checksum")
    assert src["precopy_rounds"] >= 1


@pytest.mark.parametrize("mode,flag,phase", [
    ("precopy", "--precopy-bandwidth", "precopy"),
    ("postcopy", "--postcopy-bandwidth", "postcopy"),
])  # fmt: skip
def test_bandwidth_caps_are_applied(pair: Pair, mode: str, flag: str, phase: str) -> None:
    """Regression: the flags used to be parsed and never forwarded to the VM process."""
    guest = Guest(memory_mib=128, vcpus=1)
    pair.start(guest)
    r = pair.send(mode, flag, "50")
    assert r.returncode == 0, r.stderr + pair.logs()
    s = r.result["stats"]
    nbytes, secs = s[f"{phase}_bytes"], s[f"{phase}_s"]
    assert nbytes > 64 << 20, s
    # A cap of 50 MB/s; unthrottled this link moves ~1 GB/s.
    assert nbytes / secs < 75e6, f"{phase}: {nbytes} bytes in {secs:.3f} s"


@pytest.mark.slow
def test_vm_migrates_onward_hop_after_hop(pair: Pair) -> None:
    """A received VM is a VM like any other: migrate it onward, four hops, the guest
    writing all along and verifying after every hop.  Hybrid hops exercise discards
    and the BULK handover, where a 1-in-8 race once left a stale page."""
    guest = Guest(memory_mib=256, vcpus=2)
    pair.start_source(guest)
    holder_sock, holder = pair.src_sock, pair.source
    for hop, mode in enumerate(("hybrid", "hybrid", "postcopy", "hybrid")):
        sock = str(pair.workdir / f"hop{hop}.sock")
        listen = f"{pair.dest_host}:0"
        proc = pair._spawn(f"hop{hop}", "dest", ["recv", "--listen", listen, "--control", sock,
                                                 "--json"])  # fmt: skip
        port = pair.wait_for(lambda s=sock: (pair.status(s) or {}).get("port"), 60,
                             f"hop {hop} to listen", procs=[proc])  # fmt: skip
        r = SendResult.parse(pair.cli("send", "--control", holder_sock, "--to",
                                      f"{pair.dest_host}:{port}", "--mode", mode, "--json",
                                      timeout=240))  # fmt: skip
        assert r.returncode == 0, f"hop {hop} ({mode}): {r.stderr}\n{pair.logs()}"
        assert holder is not None and holder.wait(60) == 0, pair.logs()
        pair.assert_verifies(sock, guest.vcpus)
        holder_sock, holder = sock, proc
