"""The built-in guests on the real /dev/kvm: build, boot under the ABI, report, verify."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest

from migrated.guests.build import GuestBuildError, guest_image
from migrated.vmm import Machine, StatusCode, VmConfig

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"),
]

MiB = 1 << 20


def config(memory_mib: int = 64, vcpus: int = 1, **guest: object) -> VmConfig:
    guest.setdefault("builtin", "memstress")
    return VmConfig.from_dict(
        {"name": "t", "memory_mib": memory_mib, "vcpus": vcpus, "guest": dict(guest)}
    )


def test_image_is_built_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = guest_image("memstress")
    assert first.parent == tmp_path / "migrated" / "guests"
    mtime = first.stat().st_mtime_ns
    assert guest_image("idle") == first  # same image, other defaults
    assert first.stat().st_mtime_ns == mtime
    assert first.read_bytes()[:3] == b"\x4c\x89\xc1"  # entry stub first: mov %r8,%rcx


def test_missing_compiler_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GuestBuildError, match="`gcc` was not found") as info:
        guest_image("memstress")
    assert "apt-get install gcc" in info.value.hint


def test_unknown_guest_name() -> None:
    with pytest.raises(GuestBuildError, match="unknown built-in guest 'nope'"):
        guest_image("nope")


@pytest.mark.parametrize(("memory_mib", "vcpus"), [(64, 1), (256, 2)])
def test_memstress_ready_then_verify_ok(memory_mib: int, vcpus: int) -> None:
    with Machine.boot(config(memory_mib, vcpus, hot_set_mib=4)) as m:
        m.start()
        ready = m.wait_ready(timeout_s=30)
        data_pages = [r.args[1] for r in ready]
        # The slices cover all guest RAM above the image but their generation tables.
        owned = (memory_mib * MiB - m.image.end_gpa) // 4096
        assert owned - vcpus - owned // 1024 <= sum(data_pages) < owned
        assert all(r.args[0] == r.args[1] for r in ready)  # fill_percent 100
        time.sleep(0.2)
        for expected_pass in (1, 2):
            reports = m.verify(timeout_s=30)
            assert [r.ok for r in reports] == [True] * vcpus, [r.text for r in reports]
            assert [r.args[:2] for r in reports] == [(n, expected_pass) for n in data_pages]
        assert m.console_tail().startswith(b"memstress: %d vcpu(s), %d MiB" % (vcpus, memory_mib))


def test_partial_fill_and_periodic_verify() -> None:
    with Machine.boot(config(fill_percent=30, verify_every_writes=20000, hot_set_pages=64)) as m:
        m.start()
        (ready,) = m.wait_ready(timeout_s=30)
        filled, data_pages = ready.args[:2]
        assert 0.25 < filled / data_pages < 0.35
        # Periodic verify passes arrive without being asked for.
        (first,) = m.wait_reports([StatusCode.VERIFY_OK], timeout_s=30)
        (later,) = m.wait_reports([StatusCode.VERIFY_OK], since=[first.seq], timeout_s=30)
        assert later.args[1] > first.args[1]
        assert m.board.latest(0, StatusCode.VERIFY_FAIL) is None


def test_paced_writes_follow_the_rate() -> None:
    with Machine.boot(config(writes_per_s=5000)) as m:
        m.start()
        m.wait_ready(timeout_s=30)
        (a,) = m.wait_reports([StatusCode.PROGRESS], timeout_s=5)
        (b,) = m.wait_reports([StatusCode.PROGRESS], since=[a.seq], timeout_s=5)
        rate = (b.args[0] - a.args[0]) / (b.wall_time_s - a.wall_time_s)
        assert 4000 < rate < 6000


def test_idle_guest_sleeps() -> None:
    with Machine.boot(config(builtin="idle")) as m:
        m.start()
        m.wait_ready(timeout_s=30)
        before = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(1.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        assert cpu_s < 0.3  # sleeping in the VMM, not spinning in the guest
        assert m.verify(timeout_s=5)[0].ok
        # A pause cuts the guest's sleep short.
        assert m.pause() < 0.05


def test_stop_command_halts_every_vcpu() -> None:
    with Machine.boot(config(vcpus=2, hot_set_pages=16)) as m:
        m.start()
        m.wait_ready(timeout_s=30)
        m.request_stop()
        assert m.wait_stopped(timeout_s=10).value == "stopped"
        assert {v.runstate.value for v in m.status().vcpus} == {"halted"}
        assert all(
            v.last_report is not None and v.last_report.kind == "HALT" for v in m.status().vcpus
        )
