"""The boot ABI's machine state: memory layout below 1 MiB, page tables, GDT/TSS, and
the initial registers of every vCPU.  Pure: builds bytes and records, touches nothing.

The authoritative description is docs/boot-abi.md; the constants here are that
document's tables.  Everything below 1 MiB belongs to the VMM:

=============  =========================================================
GPA            contents
=============  =========================================================
0x1000         GDT (null, code64/data DPL0, data/code64 DPL3, one TSS per vCPU)
0x2000         TSSs, 1 KiB per vCPU: 104-byte TSS + I/O bitmap (ports 0-0xFFF allowed)
0x4000         boot-parameter page: 512 u64, guest specific
0x10000        PML4; 0x11000 PDPT; 0x12000.. one PD per GiB of RAM (max 64)
0x80000        per-vCPU stacks, 64 KiB each; vCPU i's top is 0x100000 - i*0x10000
0x100000       the guest image (entry = load address + entry offset)
=============  =========================================================
"""

from __future__ import annotations

import struct
from dataclasses import replace

from migrated.kernel import DTable, Regs, Segment, Sregs

__all__ = [
    "GDT_GPA",
    "IMAGE_GPA",
    "MAX_RAM_BYTES",
    "MAX_VCPUS",
    "PARAMS_GPA",
    "PARAMS_MAX",
    "PML4_GPA",
    "boot_regs",
    "boot_sregs",
    "build_boot_area",
    "build_gdt",
    "build_page_tables",
    "build_tss",
    "stack_top",
    "tss_gpa",
    "tss_selector",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

GDT_GPA = 0x1000
TSS_BASE_GPA = 0x2000
TSS_STRIDE = 1024
TSS_BYTES = 104  # the 64-bit TSS proper
IO_BITMAP_PORTS = 0x1000  # ports 0..0xFFF are allowed by the TSS I/O permission bitmap
# The bitmap follows the TSS and ends with the 0xFF byte the architecture requires.
TSS_LIMIT = TSS_BYTES + IO_BITMAP_PORTS // 8
PARAMS_GPA = 0x4000
PARAMS_MAX = 512  # u64 entries in the 4 KiB page
PML4_GPA = 0x10000
PDPT_GPA = 0x11000
PD_GPA = 0x12000
STACKS_GPA = 0x80000
STACK_BYTES = 64 * KiB
IMAGE_GPA = 0x100000

MAX_VCPUS = 8
MAX_RAM_BYTES = 64 * GiB  # 64 page directories fit between PD_GPA and STACKS_GPA
LARGE_PAGE = 2 * MiB

# GDT selectors.
SEL_CODE0 = 0x08
SEL_DATA0 = 0x10
SEL_DATA3 = 0x18
SEL_CODE3 = 0x20
SEL_TSS0 = 0x28  # 16-byte system descriptors from here, one per vCPU

# Control register bits.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1
RFLAGS_IOPL3 = 3 << 12

# Page-table entry bits.
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PS = 1 << 7

# Segment types as KVM wants them (accessed bit set).
TYPE_CODE_XR = 0xB
TYPE_DATA_RW = 0x3
TYPE_TSS64_BUSY = 0xB


def tss_gpa(vcpu_index: int) -> int:
    return TSS_BASE_GPA + vcpu_index * TSS_STRIDE


def tss_selector(vcpu_index: int) -> int:
    return SEL_TSS0 + 16 * vcpu_index


def stack_top(vcpu_index: int) -> int:
    """Top (exclusive) of vCPU ``vcpu_index``'s 64 KiB stack; 16-byte aligned."""
    return IMAGE_GPA - vcpu_index * STACK_BYTES


def _descriptor(base: int, limit: int, access: int, flags: int) -> int:
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (access & 0xFF) << 40
        | ((limit >> 16) & 0xF) << 48
        | (flags & 0xF) << 52
        | ((base >> 24) & 0xFF) << 56
    )


def build_gdt(vcpus: int) -> bytes:
    """The GDT: flat code64/data at DPL0 and DPL3, then one busy 64-bit TSS per vCPU."""
    flat = 0xFFFFF
    entries = [
        0,
        _descriptor(0, flat, 0x9A, 0xA),  # code64 DPL0: P, S, exec/read; G, L
        _descriptor(0, flat, 0x92, 0xC),  # data DPL0: P, S, read/write; G, D/B
        _descriptor(0, flat, 0xF2, 0xC),  # data DPL3
        _descriptor(0, flat, 0xFA, 0xA),  # code64 DPL3
    ]
    for i in range(vcpus):
        base = tss_gpa(i)
        entries.append(_descriptor(base & 0xFFFFFFFF, TSS_LIMIT, 0x8B, 0))  # P, busy TSS64
        entries.append(base >> 32)
    return struct.pack(f"<{len(entries)}Q", *entries)


def build_tss(vcpu_index: int) -> bytes:
    """A 64-bit TSS (RSP0 = the vCPU's stack top) with an I/O permission bitmap that
    allows ports 0..0xFFF.

    The bitmap is what makes port I/O work at CPL3 under kvm_pvm: that hypervisor runs
    the guest with hardware IOPL 0 whatever RFLAGS.IOPL says, so every IN/OUT raises
    #GP, and KVM's instruction emulator then allows it only if the guest TSS's bitmap
    does.  On VT-x/SVM hosts RFLAGS.IOPL=3 alone would do.
    """
    tss = bytearray(TSS_LIMIT + 1)  # bitmap bytes are zero: every port allowed
    struct.pack_into("<Q", tss, 4, stack_top(vcpu_index))  # RSP0
    struct.pack_into("<H", tss, 102, TSS_BYTES)  # I/O map base: right after the TSS
    tss[TSS_LIMIT] = 0xFF  # the terminating byte
    return bytes(tss)


def build_page_tables(ram_bytes: int) -> bytes:
    """PML4, PDPT and the PDs identity-mapping ``ram_bytes`` with 2 MiB pages (U/S, R/W),
    laid out contiguously from PML4_GPA."""
    if ram_bytes <= 0 or ram_bytes % LARGE_PAGE or ram_bytes > MAX_RAM_BYTES:
        raise ValueError(f"guest RAM of {ram_bytes} bytes is not a multiple of 2 MiB up to 64 GiB")
    n_pds = -(-ram_bytes // GiB)
    table = bytearray(4096 * (2 + n_pds))
    upper = PTE_P | PTE_RW | PTE_US
    struct.pack_into("<Q", table, 0, PDPT_GPA | upper)
    for k in range(n_pds):
        struct.pack_into("<Q", table, 4096 + 8 * k, (PD_GPA + 4096 * k) | upper)
    n_large = ram_bytes // LARGE_PAGE
    pds = struct.pack(f"<{n_large}Q", *((j * LARGE_PAGE) | upper | PTE_PS for j in range(n_large)))
    table[8192 : 8192 + len(pds)] = pds
    return bytes(table)


def build_boot_area(
    *, ram_bytes: int, vcpus: int, params: tuple[int, ...] | list[int]
) -> list[tuple[int, bytes]]:
    """Everything the VMM writes below 1 MiB at boot, as ``(gpa, bytes)`` pieces."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"{vcpus} vCPUs: the boot ABI supports 1..{MAX_VCPUS}")
    if len(params) > PARAMS_MAX:
        raise ValueError(f"{len(params)} boot parameters: the page holds {PARAMS_MAX}")
    pieces = [
        (GDT_GPA, build_gdt(vcpus)),
        (PARAMS_GPA, struct.pack(f"<{len(params)}Q", *params)),
        (PML4_GPA, build_page_tables(ram_bytes)),
    ]
    pieces += [(tss_gpa(i), build_tss(i)) for i in range(vcpus)]
    return pieces


def boot_regs(*, vcpu_index: int, vcpus: int, ram_bytes: int, entry_gpa: int, cpl: int = 3) -> Regs:
    """The general registers a vCPU starts with (see docs/boot-abi.md)."""
    rflags = RFLAGS_RESERVED | (RFLAGS_IOPL3 if cpl == 3 else 0)
    return Regs(
        rdi=ram_bytes,
        rsi=vcpu_index,
        rdx=vcpus,
        r8=PARAMS_GPA,
        rsp=stack_top(vcpu_index),
        rip=entry_gpa,
        rflags=rflags,
    )


def boot_sregs(template: Sregs, *, vcpu_index: int, vcpus: int, cpl: int = 3) -> Sregs:
    """64-bit long mode with paging at ``cpl`` (3 or 0).  ``template`` is the vCPU's
    current Sregs; only ``apic_base`` (and cr8, cr2) are kept from it."""
    if cpl not in (0, 3):
        raise ValueError(f"cpl must be 0 or 3, not {cpl}")
    code_sel, data_sel = (SEL_CODE3 | 3, SEL_DATA3 | 3) if cpl == 3 else (SEL_CODE0, SEL_DATA0)
    flat = {"base": 0, "limit": 0xFFFFFFFF, "present": 1, "dpl": cpl, "s": 1, "g": 1}
    code = Segment(selector=code_sel, type=TYPE_CODE_XR, l=1, db=0, **flat)
    data = Segment(selector=data_sel, type=TYPE_DATA_RW, l=0, db=1, **flat)
    tr = Segment(
        base=tss_gpa(vcpu_index),
        limit=TSS_LIMIT,
        selector=tss_selector(vcpu_index),
        type=TYPE_TSS64_BUSY,
        present=1,
    )
    ldt = Segment(type=0x2, unusable=1)
    return replace(
        template,
        cs=code,
        ds=data,
        es=data,
        fs=data,
        gs=data,
        ss=data,
        tr=tr,
        ldt=ldt,
        gdt=DTable(GDT_GPA, 8 * (5 + 2 * vcpus) - 1),
        idt=DTable(0, 0),
        cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        cr3=PML4_GPA,
        cr4=CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
        efer=EFER_LME | EFER_LMA,
    )
