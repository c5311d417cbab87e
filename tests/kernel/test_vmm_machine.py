"""The embedded VMM on the real /dev/kvm: custom images, crashes, pause/resume."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from migrated.errors import GuestCrashed
from migrated.vmm import (
    Machine,
    MachineStateError,
    Runstate,
    StatusCode,
    VcpuRunstate,
    VmConfig,
)

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"),
]

MiB = 1 << 20

# mov (%r8),%rbx; mov %rdx,%rcx; mov $1,%eax; mov $0x510,%edx; out %eax,(%dx)  -> READY
# mov %rsp,%rbx; mov $4,%eax; out %eax,(%dx)                                   -> PROGRESS
# mov $5,%eax; out %eax,(%dx)                                                  -> HALT
ABI_PROBE = bytes.fromhex("498b184889d1b801000000ba10050000ef4889e3b804000000efb805000000ef")
UD2 = b"\x0f\x0b"


def image_config(
    tmp_path: Path, code: bytes, *, vcpus: int = 1, cpl: int = 3, **guest: object
) -> VmConfig:
    path = tmp_path / "guest.bin"
    path.write_bytes(code)
    return VmConfig.from_dict(
        {
            "name": "img",
            "memory_mib": 8,
            "vcpus": vcpus,
            "cpl": cpl,
            "guest": {"image": str(path), **guest},
        }
    )


def memstress(memory_mib: int = 64, vcpus: int = 2, **guest: object) -> VmConfig:
    return VmConfig.from_dict(
        {
            "name": "ms",
            "memory_mib": memory_mib,
            "vcpus": vcpus,
            "guest": {"builtin": "memstress", "hot_set_mib": 4, **guest},
        }
    )


def test_abi_registers_and_params(tmp_path: Path) -> None:
    # Entry offset 2 skips a ud2 that would crash the guest.
    cfg = image_config(tmp_path, UD2 + ABI_PROBE, vcpus=2, entry_offset=2, params=[0xABCDEF])
    with Machine.boot(cfg) as m:
        m.start()
        assert m.wait_stopped(timeout_s=10) is Runstate.STOPPED
        for i in range(2):
            ready = m.board.latest(i, StatusCode.READY)
            assert ready is not None
            # rbx = params[0], rcx = vCPU count, rsi = index, rdi = RAM bytes
            assert ready.args == (0xABCDEF, 2, i, 8 * MiB)
            progress = m.board.latest(i, StatusCode.PROGRESS)
            assert progress is not None and progress.args[0] == 0x100000 - i * 0x10000


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (UD2, "triple fault"),
        # movabs %rax, 0x40000000: beyond the 8 MiB of RAM, not mapped -> #PF
        (bytes.fromhex("48a30000004000000000"), "triple fault"),
        (b"\xf4", "triple fault"),  # hlt is privileged at CPL3
        (bytes.fromhex("e680"), "OUT to port 0x80"),  # out %al, $0x80
        (bytes.fromhex("e581"), "IN from port 0x81"),  # in $0x81, %eax
    ],
    ids=["ud2", "unmapped-write", "hlt-at-cpl3", "bad-out-port", "bad-in-port"],
)
def test_faulting_guest_is_reported_as_crashed(tmp_path: Path, code: bytes, reason: str) -> None:
    with Machine.boot(image_config(tmp_path, code)) as m:
        m.start()
        with pytest.raises(GuestCrashed, match=reason) as info:
            m.wait_ready(timeout_s=10)
        assert "rip=0x10000" in str(info.value)
        assert m.runstate is Runstate.CRASHED
        (vcpu,) = m.status().vcpus
        assert vcpu.runstate is VcpuRunstate.CRASHED
        assert vcpu.crash is not None and vcpu.crash.regs is not None
        assert vcpu.crash.regs.rip in (0x100000, 0x100000 + len(code))
        with pytest.raises(MachineStateError):
            m.pause()


def test_crash_of_one_vcpu_stops_the_others(tmp_path: Path) -> None:
    # vCPU 1 faults on ud2 (rsi = 1), vCPU 0 spins: cmp $1,%rsi; je ud2; jmp .
    code = bytes.fromhex("4883fe017402ebfe") + UD2
    with Machine.boot(image_config(tmp_path, code, vcpus=2)) as m:
        m.start()
        assert m.wait_stopped(timeout_s=10) is Runstate.CRASHED
        states = [v.runstate for v in m.status().vcpus]
        assert states == [VcpuRunstate.STOPPED, VcpuRunstate.CRASHED]
        assert m.crash is not None and m.crash.vcpu == 1


def test_hlt_at_cpl0_halts(tmp_path: Path) -> None:
    with Machine.boot(image_config(tmp_path, b"\xf4", cpl=0)) as m:
        m.start()
        assert m.wait_stopped(timeout_s=10) is Runstate.STOPPED
        assert m.status().vcpus[0].runstate is VcpuRunstate.HALTED


def test_runstate_guards() -> None:
    with Machine.boot(memstress(memory_mib=8, vcpus=1)) as m:
        with pytest.raises(MachineStateError, match="is created, needs to be running"):
            m.pause()
        with pytest.raises(MachineStateError):
            m.capture_state()
        m.start()
        with pytest.raises(MachineStateError):
            m.start()
        with pytest.raises(MachineStateError):
            m.resume()
        m.pause()
        with pytest.raises(MachineStateError):
            m.pause()
        m.stop()
        assert m.runstate is Runstate.STOPPED
        m.stop()  # idempotent
    m.close()  # idempotent


def test_start_paused_runs_nothing() -> None:
    with Machine.boot(memstress(memory_mib=8, vcpus=1)) as m:
        m.start(paused=True)
        assert m.runstate is Runstate.PAUSED
        time.sleep(0.1)
        assert m.board.marks() == (0,)
        assert m.status().vcpus[0].runstate is VcpuRunstate.PARKED
        m.resume()
        m.wait_ready(timeout_s=10)


def test_pause_resume_under_load_then_verify() -> None:
    rng = random.Random(5)
    with Machine.boot(memstress(memory_mib=64, vcpus=2)) as m:
        m.start()
        m.wait_ready(timeout_s=30)
        latencies = []
        for _ in range(300):
            latencies.append(m.pause())
            assert {v.runstate for v in m.status().vcpus} == {VcpuRunstate.PARKED}
            m.resume()
            if rng.random() < 0.5:
                time.sleep(rng.random() * 0.003)
        latencies.sort()
        assert latencies[len(latencies) // 2] < 0.01
        # Verify requests crossing pauses are still answered.
        marks = m.request_verify()
        for _ in range(20):
            m.pause()
            m.resume()
        reports = m.wait_reports(
            [StatusCode.VERIFY_OK, StatusCode.VERIFY_FAIL], since=marks, timeout_s=30
        )
        assert all(r.ok for r in reports), [r.text for r in reports]
        assert all(r.ok for r in m.verify(timeout_s=30))


def test_corruption_and_lost_pages_are_detected() -> None:
    with Machine.boot(memstress(memory_mib=64, vcpus=1)) as m:
        m.start()
        m.wait_ready(timeout_s=30)
        m.pause()
        # The middle of RAM is a data page outside the 4 MiB hot set, so the guest
        # does not rewrite it before it verifies.
        gpa = 32 * MiB + 8 * 17
        view = m.memory.view
        original = bytes(view[gpa : gpa + 8])
        view[gpa : gpa + 8] = b"\x55" * 8
        m.resume()
        (fail,) = m.verify(timeout_s=30)
        assert not fail.ok
        assert fail.args[:3] == (gpa, int.from_bytes(original, "little"), 0x5555555555555555)
        assert fail.args[3] == 1  # generation of a filled, never rewritten page
        assert f"VERIFY FAIL at gpa {gpa:#x}" in fail.text

        m.pause()
        view[gpa : gpa + 8] = original
        m.memory.discard(40 * MiB, 4096)  # a lost page reads as zeros
        m.resume()
        (fail,) = m.verify(timeout_s=30)
        assert not fail.ok and fail.args[0] == 40 * MiB and fail.args[2] == 0


def test_status_describes_reports_and_crashes(tmp_path: Path) -> None:
    with Machine.boot(memstress(memory_mib=16, vcpus=1)) as m:
        m.start()
        m.wait_ready(timeout_s=10)
        m.verify(timeout_s=10)
        text = m.status().describe()
        assert "running, 16 MiB, 1 vCPU(s)" in text
        assert "vCPU 0: running; verify ok" in text
    with Machine.boot(image_config(tmp_path, UD2)) as m:
        m.start()
        m.wait_stopped(timeout_s=10)
        text = m.status().describe()
        assert "crashed" in text and "triple fault" in text and "rip=0x100000" in text
