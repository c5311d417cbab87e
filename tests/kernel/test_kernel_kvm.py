"""The KVM half of the kernel layer, on the real /dev/kvm."""

from __future__ import annotations

import dataclasses

import pytest

from migrated.kernel import Cap, ExitReason, Kvm, PageBitmap, VcpuState

from .realmode import CODE_GPA, realmode_vm

pytestmark = pytest.mark.kvm

# mov byte [0x5000],0x11 ; mov byte [0x9000],0x22 ; mov byte [0xE000],0x33 ; hlt
WRITE_THREE_PAGES = bytes.fromhex("c606005011c606009022c60600e033f4")
# out 0x10, al ; hlt
OUT_AL = bytes.fromhex("e610f4")


def test_capabilities_and_msr_list() -> None:
    with Kvm.open() as kvm:
        assert kvm.check_extension(Cap.USER_MEMORY) == 1
        assert kvm.check_extension(Cap.IMMEDIATE_EXIT) == 1
        assert kvm.vcpu_mmap_size >= 4096
        assert len(kvm.msr_indices()) > 5
    kvm.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        kvm.check_extension(Cap.USER_MEMORY)


def test_open_missing_device_names_the_path() -> None:
    with pytest.raises(OSError, match="/nonexistent/kvm"):
        Kvm.open("/nonexistent/kvm")


def test_guest_runs_and_halts_and_io_exit_carries_data() -> None:
    with realmode_vm(OUT_AL) as rm:
        regs = rm.vcpu.get_regs()
        rm.vcpu.set_regs(dataclasses.replace(regs, rax=0x5A))
        ex = rm.vcpu.run()
        assert ex.reason is ExitReason.IO and not ex.io_in
        assert (ex.port, ex.size, ex.data) == (0x10, 1, b"\x5a")
        assert rm.vcpu.run().reason is ExitReason.HLT


def test_dirty_log_reflects_exactly_the_pages_written_and_clears() -> None:
    with realmode_vm(WRITE_THREE_PAGES, log_dirty=True) as rm:
        rm.vm.get_dirty_log(0)  # start from a clean log
        assert rm.vcpu.run().reason is ExitReason.HLT
        bm = PageBitmap.from_bytes(256, rm.vm.get_dirty_log(0))
        assert [i for i, n in bm.runs() for i in range(i, i + n)] == [5, 9, 14]
        assert rm.memory.view[0x5000] == 0x11 and rm.memory.view[0xE000] == 0x33
        # KVM_GET_DIRTY_LOG cleared the log as it read it.
        assert PageBitmap.from_bytes(256, rm.vm.get_dirty_log(0)).count() == 0


def test_manual_dirty_protect_needs_explicit_clear() -> None:
    with realmode_vm(WRITE_THREE_PAGES, log_dirty=False) as rm:
        if not rm.vm.enable_manual_dirty_protect():
            pytest.skip("host lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        rm.vm.set_memory_region(0, 0, rm.memory, log_dirty=True)
        first = rm.vm.get_dirty_log(0)
        rm.vm.clear_dirty_log(0, first)  # pages may start dirty (INITIALLY_SET)
        assert rm.vcpu.run().reason is ExitReason.HLT
        log = rm.vm.get_dirty_log(0)
        assert PageBitmap.from_bytes(256, log).count() == 3
        assert PageBitmap.from_bytes(256, rm.vm.get_dirty_log(0)).count() == 3  # not cleared
        rm.vm.clear_dirty_log(0, log)
        assert PageBitmap.from_bytes(256, rm.vm.get_dirty_log(0)).count() == 0


def test_vcpu_state_roundtrip_into_a_fresh_vcpu() -> None:
    with realmode_vm(OUT_AL) as a:
        a.vcpu.set_regs(dataclasses.replace(a.vcpu.get_regs(), rax=0x77, rbx=0x1234))
        state = a.vcpu.get_state()
        assert {"regs", "sregs", "mp_state"} <= set(state.parts)
        assert len(state.msrs) > 5
        blob = VcpuState.from_dict(state.to_dict())
        with realmode_vm(OUT_AL) as b:
            b.vcpu.set_state(blob)
            assert b.vcpu.get_regs().rbx == 0x1234
            assert b.vcpu.get_sregs() == a.vcpu.get_sregs()
            ex = b.vcpu.run()
            assert ex.data == b"\x77"


def test_malformed_state_record_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="lacks its 'sregs'"):
        VcpuState.from_dict({"index": 0, "parts": {"regs": b""}, "msrs": []})
    with pytest.raises(ValueError, match="malformed"):
        VcpuState.from_dict({"index": 0})


def test_immediate_exit_returns_eintr_without_entering() -> None:
    with realmode_vm(OUT_AL) as rm:
        rm.vcpu.immediate_exit = True
        with pytest.raises(InterruptedError):
            rm.vcpu.run()
        rm.vcpu.immediate_exit = False
        assert rm.vcpu.run().reason is ExitReason.IO
        assert rm.vcpu.get_regs().rip == CODE_GPA + 2


def test_pre_fault_memory_probe_and_fallback() -> None:
    with realmode_vm(OUT_AL) as rm:
        cap = rm.kvm.check_extension(Cap.PRE_FAULT_MEMORY)
        result = rm.vcpu.pre_fault_memory(0, 0x10000)
        assert result.calls >= 1
        if cap:
            assert result.supported and result.nbytes_done == 0x10000
        else:
            # Shadow paging (this host): EOPNOTSUPP is a result, not an exception.
            assert not result.supported and result.nbytes_done == 0
