"""Pure builders of the boot ABI and the VmState record format (no KVM)."""

from __future__ import annotations

import struct

import msgpack
import pytest

from migrated.kernel import Regs, Sregs, VcpuState
from migrated.vmm import boot
from migrated.vmm.devices import CommandMailbox, StatusReport
from migrated.vmm.image import ImageInfo
from migrated.vmm.state import STATE_VERSION, MemoryRegionInfo, VmState, VmStateError

MiB = 1 << 20


def test_page_tables_identity_map_with_user_2mib_pages() -> None:
    ram = 3 * 1024 * MiB  # 3 GiB: three page directories
    pt = boot.build_page_tables(ram)
    assert len(pt) == 4096 * (2 + 3)
    (pml4e,) = struct.unpack_from("<Q", pt, 0)
    assert pml4e == boot.PDPT_GPA | 0x7
    for k in range(3):
        (pdpte,) = struct.unpack_from("<Q", pt, 4096 + 8 * k)
        assert pdpte == (boot.PD_GPA + 4096 * k) | 0x7
    (absent,) = struct.unpack_from("<Q", pt, 4096 + 8 * 3)
    assert absent == 0
    n = ram // (2 * MiB)
    entries = struct.unpack_from(f"<{n}Q", pt, 8192)
    assert all(e == (j * 2 * MiB) | 0x87 for j, e in enumerate(entries))
    assert boot.PD_GPA + 64 * 4096 <= boot.STACKS_GPA  # 64 GiB fits below the stacks


@pytest.mark.parametrize("ram", [0, 3 * MiB, 65 * 1024 * MiB])
def test_page_tables_reject_bad_sizes(ram: int) -> None:
    with pytest.raises(ValueError):
        boot.build_page_tables(ram)


def test_gdt_and_tss() -> None:
    gdt = boot.build_gdt(2)
    assert len(gdt) == 8 * (5 + 4)
    code3 = struct.unpack_from("<Q", gdt, boot.SEL_CODE3)[0]
    assert (code3 >> 40) & 0xFF == 0xFA  # present, DPL3, code
    assert (code3 >> 52) & 0xF == 0xA  # G, L
    tss1 = struct.unpack_from("<Q", gdt, boot.tss_selector(1))[0]
    base = (tss1 >> 16) & 0xFFFFFF | ((tss1 >> 56) & 0xFF) << 24
    assert base == boot.tss_gpa(1)
    assert (tss1 >> 40) & 0xFF == 0x8B  # present, busy 64-bit TSS
    tss = boot.build_tss(1)
    assert len(tss) == boot.TSS_LIMIT + 1 <= boot.TSS_STRIDE
    assert struct.unpack_from("<H", tss, 102)[0] == 104
    assert tss[104:-1] == bytes(512) and tss[-1] == 0xFF
    assert struct.unpack_from("<Q", tss, 4)[0] == boot.stack_top(1)


def test_layout_does_not_overlap() -> None:
    assert boot.tss_gpa(boot.MAX_VCPUS) <= boot.PARAMS_GPA
    assert boot.stack_top(boot.MAX_VCPUS - 1) - boot.STACK_BYTES == boot.STACKS_GPA
    assert boot.stack_top(0) == boot.IMAGE_GPA


def test_boot_registers() -> None:
    regs = boot.boot_regs(vcpu_index=1, vcpus=2, ram_bytes=64 * MiB, entry_gpa=0x100010)
    assert (regs.rdi, regs.rsi, regs.rdx, regs.r8) == (64 * MiB, 1, 2, boot.PARAMS_GPA)
    assert regs.rsp == 0x100000 - 0x10000 and regs.rip == 0x100010
    assert regs.rflags == 0x3002
    s = boot.boot_sregs(Sregs(apic_base=0xFEE00900), vcpu_index=1, vcpus=2)
    assert (s.cs.selector, s.cs.dpl, s.cs.l, s.ss.selector, s.ss.dpl) == (0x23, 3, 1, 0x1B, 3)
    assert s.tr.base == boot.tss_gpa(1) and s.tr.type == 0xB
    assert s.efer == 0x500 and s.cr3 == boot.PML4_GPA and s.apic_base == 0xFEE00900
    assert s.cr0 & 0x80010033 == 0x80010033
    s0 = boot.boot_sregs(Sregs(), vcpu_index=0, vcpus=1, cpl=0)
    assert (s0.cs.selector, s0.cs.dpl, s0.ss.selector) == (0x08, 0, 0x10)
    with pytest.raises(ValueError):
        boot.boot_sregs(Sregs(), vcpu_index=0, vcpus=1, cpl=2)


def test_boot_area_checks_limits() -> None:
    with pytest.raises(ValueError):
        boot.build_boot_area(ram_bytes=64 * MiB, vcpus=9, params=[])
    with pytest.raises(ValueError):
        boot.build_boot_area(ram_bytes=64 * MiB, vcpus=1, params=[0] * 513)


def test_mailbox_stop_is_sticky() -> None:
    box = CommandMailbox(2)
    box.post(1)
    assert box.take(0) == 1 and box.take(0) == 0
    box.post(2)
    box.post(1)
    assert box.take(1) == 2 and box.take(1) == 2


def _fake_state() -> VmState:
    vcpu = VcpuState(index=0, parts={"regs": b"\0" * 144, "sregs": b"\0" * 312}, msrs=((0x10, 5),))
    return VmState(
        config={"name": "x", "memory_mib": 2, "guest": {"builtin": "idle"}},
        regions=(MemoryRegionInfo(0, 0, 2 * MiB),),
        image=ImageInfo("idle", "ab" * 32, 100, 0x100000, 0x100000),
        params=(1, 2, 3),
        vcpus=(vcpu,),
        halted=(False,),
        console_bytes=7,
        report_seqs=(3,),
        reports=(StatusReport(0, 3, 2, (1, 2, 3, 4), 1.5),),
        pending_commands=(1,),
    )


def test_vmstate_round_trip() -> None:
    state = _fake_state()
    again = VmState.from_bytes(state.to_bytes())
    assert again == state
    assert again.reports[0].text == "verify ok, 1 pages, pass 2"


def test_vmstate_other_version_is_a_clear_error() -> None:
    record = msgpack.unpackb(_fake_state().to_bytes())
    record["version"] = STATE_VERSION + 1
    with pytest.raises(VmStateError, match=f"version {STATE_VERSION + 1}.*reads version"):
        VmState.from_bytes(msgpack.packb(record))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xc1garbage", "not a msgpack record"),
        (msgpack.packb([1, 2]), "magic missing"),
        (msgpack.packb({"magic": "migrated-vmstate", "version": STATE_VERSION}), "malformed"),
    ],
)
def test_vmstate_corrupt_records(data: bytes, message: str) -> None:
    with pytest.raises(VmStateError, match=message):
        VmState.from_bytes(data)


def test_vmstate_truncated_record() -> None:
    data = _fake_state().to_bytes()
    with pytest.raises(VmStateError):
        VmState.from_bytes(data[: len(data) // 2])


def test_crash_text_has_registers() -> None:
    from migrated.vmm import CrashInfo

    text = CrashInfo(0, "triple fault", Regs(rip=0x100002, rax=5)).describe()
    assert "rip=0x100002" in text and "rax=0x5" in text
