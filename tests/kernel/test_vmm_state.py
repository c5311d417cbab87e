"""State capture and restore on the real /dev/kvm: a guest paused in one VM continues
in another with the same memory contents."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from migrated.kernel import GuestMemory, UffdFeature, Userfaultfd
from migrated.vmm import (
    Machine,
    MachineStateError,
    Runstate,
    StatusCode,
    VcpuRunstate,
    VmConfig,
    VmShell,
    VmState,
    VmStateError,
)

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"),
]

MiB = 1 << 20


def memstress(memory_mib: int = 64, vcpus: int = 2) -> VmConfig:
    return VmConfig.from_dict(
        {
            "name": "ms",
            "memory_mib": memory_mib,
            "vcpus": vcpus,
            "guest": {"builtin": "memstress", "hot_set_mib": 4},
        }
    )


@pytest.fixture
def paused_source() -> Iterator[Machine]:
    with Machine.boot(memstress()) as m:
        m.start()
        m.wait_ready(timeout_s=30)
        time.sleep(0.2)
        m.pause()
        yield m


def copy_of(memory: GuestMemory) -> GuestMemory:
    new = GuestMemory.create(memory.nbytes)
    new.view[:] = memory.view
    return new


def progress(m: Machine) -> list[int]:
    reports = [m.board.latest(i, StatusCode.PROGRESS) for i in range(m.config.vcpus)]
    return [r.args[0] if r is not None else 0 for r in reports]


def test_state_round_trips_through_bytes(paused_source: Machine) -> None:
    state = paused_source.capture_state()
    data = state.to_bytes()
    again = VmState.from_bytes(data)
    assert again == state
    assert again.report_seqs == paused_source.board.marks()
    assert [v.regs.rip for v in again.vcpus] == [v.regs.rip for v in state.vcpus]
    assert again.config["uuid"] == paused_source.config.uuid
    assert again.image.sha256 == paused_source.image.sha256


def test_restored_guest_continues_and_verifies(paused_source: Machine) -> None:
    state = VmState.from_bytes(paused_source.capture_state().to_bytes())
    written_before = progress(paused_source)
    with copy_of(paused_source.memory) as memory, Machine.restore(state, memory=memory) as m:
        assert m.board.marks() == state.report_seqs
        m.start()
        time.sleep(1.2)  # long enough for a PROGRESS report from the new VM
        reports = m.verify(timeout_s=30)
        assert all(r.ok for r in reports), [r.text for r in reports]
        # Verify pass numbers continue: the guest's own counters came along.
        assert all(r.args[1] == 1 for r in reports)
        assert all(a > b for a, b in zip(progress(m), written_before, strict=True))
        assert m.console.bytes_written == paused_source.console.bytes_written


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_restored_into_a_shell_built_ahead_the_guest_continues(paused_source: Machine) -> None:
    """A destination builds the KVM VM, slot and vCPUs at Setup (VmShell); the restore
    adopts them, the guest continues and verifies, and closing the machine releases
    what the shell opened."""
    state = VmState.from_bytes(paused_source.capture_state().to_bytes())
    before = fds()
    memory = copy_of(paused_source.memory)
    shell = VmShell(memory, vcpus=2)
    assert fds() >= before + 4  # /dev/kvm, the VM, two vCPUs (and the memory's fd)
    m = Machine.restore(state, memory=memory, own_memory=True, shell=shell)
    with m:
        with pytest.raises(ValueError, match="already taken"):
            shell.take()
        m.start()
        reports = m.verify(timeout_s=30)
        assert all(r.ok for r in reports), [r.text for r in reports]
    shell.close()  # idempotent, owns nothing now
    assert fds() == before


def test_a_shell_that_does_not_fit_is_refused_and_stays_the_callers(
    paused_source: Machine,
) -> None:
    state = paused_source.capture_state()
    before = fds()
    with copy_of(paused_source.memory) as memory:
        shell = VmShell(memory, vcpus=1)  # the state has 2
        with pytest.raises(VmStateError, match="prepared KVM VM does not fit"):
            Machine.restore(state, memory=memory, shell=shell)
        other = VmShell(memory, vcpus=2)
        with copy_of(memory) as elsewhere, pytest.raises(VmStateError, match="does not fit"):
            Machine.restore(state, memory=elsewhere, shell=other)  # a shell over other memory
        # Still usable by its owner, who closes it.
        kvm, vm, vcpus, owns_kvm = shell.take()
        assert owns_kvm  # it opened /dev/kvm itself
        assert len(vcpus) == 1
        for v in vcpus:
            v.close()
        vm.close()
        kvm.close()
        other.close()
    assert fds() == before


def test_state_hops_through_several_vms(paused_source: Machine) -> None:
    """A pending verify request travels with the state; the guest answers it after
    three hops, each with a fresh VM and a copy of the memory."""
    paused_source.request_verify()
    marks = paused_source.board.marks()
    state, memory = paused_source.capture_state(), copy_of(paused_source.memory)
    assert state.pending_commands == (1, 1)
    for hop in range(3):
        m = Machine.restore(state, memory=memory)
        try:
            m.start()
            if hop == 2:
                reports = m.wait_reports(
                    [StatusCode.VERIFY_OK, StatusCode.VERIFY_FAIL], since=marks, timeout_s=30
                )
                assert all(r.ok for r in reports), [r.text for r in reports]
                break
            time.sleep(0.05)
            m.pause()
            state, old = m.capture_state(), memory
            memory = copy_of(old)
        finally:
            m.close()
        old.close()
    memory.close()


# vCPU 1 reports HALT at once; vCPU 0 loops sleeping 1 ms through port 0x513:
#   cmp $1,%rsi; jne 1f; mov $5,%eax; mov $0x510,%edx; out %eax,(%dx)
#   1: mov $0x513,%edx; mov $1000,%eax; out %eax,(%dx); jmp 1b
HALT_ONE = bytes.fromhex("4883fe01750bb805000000ba10050000efba13050000b8e8030000efebf3")


def test_halted_vcpus_stay_halted(tmp_path: Path) -> None:
    image = tmp_path / "g.bin"
    image.write_bytes(HALT_ONE)
    cfg = VmConfig.from_dict(
        {"name": "h", "memory_mib": 8, "vcpus": 2, "guest": {"image": str(image)}}
    )
    with Machine.boot(cfg) as m:
        m.start()
        deadline = time.monotonic() + 10
        while m.status().vcpus[1].runstate is not VcpuRunstate.HALTED:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        m.pause()
        state = VmState.from_bytes(m.capture_state().to_bytes())
        assert state.halted == (False, True)
        memory = copy_of(m.memory)
    with memory, Machine.restore(state, memory=memory) as m2:
        m2.start()
        assert [v.runstate for v in m2.status().vcpus][1] is VcpuRunstate.HALTED
        time.sleep(0.05)
        m2.pause()
        assert [v.runstate for v in m2.status().vcpus] == [
            VcpuRunstate.PARKED,
            VcpuRunstate.HALTED,
        ]


def test_state_captured_before_the_first_run_boots_the_guest() -> None:
    with Machine.boot(memstress(memory_mib=16, vcpus=2)) as m:
        m.start(paused=True)
        state = m.capture_state()
        memory = copy_of(m.memory)
    with memory, Machine.restore(state, memory=memory) as m2:
        m2.start()
        assert len(m2.wait_ready(timeout_s=30)) == 2
        assert all(r.ok for r in m2.verify(timeout_s=30))


def test_restore_rejects_mismatches(paused_source: Machine) -> None:
    state = paused_source.capture_state()
    with GuestMemory.create(32 * MiB) as small, pytest.raises(VmStateError, match="bytes"):
        Machine.restore(state, memory=small)
    other = VmConfig.from_dict({**state.config, "vcpus": 1})
    with pytest.raises(VmStateError, match="2 vCPUs, the config 1"):
        Machine.restore(state, config=other)


def test_corrupt_and_foreign_records_are_clear_errors(paused_source: Machine) -> None:
    data = paused_source.capture_state().to_bytes()
    record = msgpack.unpackb(data)
    record["version"] = 0
    with pytest.raises(VmStateError, match="version 0"):
        VmState.from_bytes(msgpack.packb(record))
    record["version"] = 1
    record["vcpus"][0]["parts"]["bogus"] = b"x"
    with pytest.raises(VmStateError, match="unknown parts"):
        VmState.from_bytes(msgpack.packb(record))
    with pytest.raises(VmStateError):
        VmState.from_bytes(data[:-10])


@pytest.mark.uffd
def test_restore_onto_userfaultfd_memory(paused_source: Machine) -> None:
    """Postcopy in miniature: the destination memory is registered with userfaultfd and
    only a fault-serving thread installs pages (from a snapshot, never touching the
    destination memory itself); the restored guest runs and verifies.  A pause while a
    vCPU waits for a page fails cleanly and the machine keeps running."""
    state = paused_source.capture_state()
    snapshot = bytes(paused_source.memory.view)
    memory = GuestMemory.create(len(snapshot))
    uffd = Userfaultfd.open(UffdFeature.THREAD_ID)
    uffd.register(memory.address, memory.nbytes)
    serving, done = threading.Event(), threading.Event()
    served = [0]
    faulting_threads: set[int] = set()

    def serve() -> None:
        while not done.is_set():
            ready, _, _ = select.select([uffd.fileno()], [], [], 0.02)
            if not ready or not serving.is_set():
                continue
            for event in uffd.read_events():
                offset = (event.address - memory.address) & ~4095
                uffd.copy(memory.address + offset, snapshot[offset : offset + 4096], 4096)
                served[0] += 1
                faulting_threads.add(event.thread_id)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with Machine.restore(state, memory=memory) as m:
            m.start()
            time.sleep(0.1)  # the vCPUs now wait for their first pages
            with pytest.raises(MachineStateError, match="did not leave KVM_RUN"):
                m.pause(timeout_s=0.3)
            assert m.runstate is Runstate.RUNNING
            serving.set()
            reports = m.verify(timeout_s=30)
            assert all(r.ok for r in reports), [r.text for r in reports]
            assert served[0] > 0
            # Only vCPU threads fault: nothing else in the VMM touches guest memory.
            if UffdFeature.THREAD_ID in uffd.features:
                assert faulting_threads <= set(m.vcpu_thread_ids())
                assert sorted(m.vcpu_thread_ids().values()) == [0, 1]
            m.pause()
            assert {v.runstate for v in m.status().vcpus} == {VcpuRunstate.PARKED}
    finally:
        done.set()
        server.join()
        uffd.close()
        memory.close()


def test_own_memory_is_closed_with_the_machine(paused_source: Machine) -> None:
    state = paused_source.capture_state()
    kept, given = copy_of(paused_source.memory), copy_of(paused_source.memory)
    with Machine.restore(state, memory=kept):
        pass
    with Machine.restore(state, memory=given, own_memory=True):
        pass
    assert not kept.closed and given.closed
    kept.close()
