"""Typed vCPU register records and the complete, serialisable vCPU state.

Records are frozen dataclasses so callers build new values with
``dataclasses.replace``.  :class:`VcpuState` carries every piece of state KVM exposes
for an x86 vCPU without an in-kernel irqchip; the struct-shaped parts travel as the
raw bytes of their UAPI structs, which are ABI-stable across kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ._util import ffi

__all__ = ["DTable", "Regs", "Segment", "Sregs", "VcpuState"]

_REG_NAMES = tuple(
    "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
)
_SEG_FIELDS = tuple("base limit selector type present dpl db s l g avl unusable".split())
_SEG_NAMES = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"]
_CR_NAMES = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"]


@dataclass(frozen=True, slots=True)
class Regs:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    @classmethod
    def _from_c(cls, c: Any) -> Regs:
        return cls(**{n: int(getattr(c, n)) for n in _REG_NAMES})

    def _to_c(self, c: Any) -> None:
        for n in _REG_NAMES:
            setattr(c, n, getattr(self, n))


@dataclass(frozen=True, slots=True)
class Segment:
    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the KVM field name
    g: int = 0
    avl: int = 0
    unusable: int = 0


@dataclass(frozen=True, slots=True)
class DTable:
    base: int = 0
    limit: int = 0


@dataclass(frozen=True, slots=True)
class Sregs:
    """The segment and control registers.  Fields not named here (the interrupt
    bitmap) are preserved from the vCPU's current value by ``Vcpu.set_sregs``."""

    cs: Segment = Segment()
    ds: Segment = Segment()
    es: Segment = Segment()
    fs: Segment = Segment()
    gs: Segment = Segment()
    ss: Segment = Segment()
    tr: Segment = Segment()
    ldt: Segment = Segment()
    gdt: DTable = DTable()
    idt: DTable = DTable()
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0

    @classmethod
    def _from_c(cls, c: Any) -> Sregs:
        kw: dict[str, Any] = {}
        for n in _SEG_NAMES:
            seg = getattr(c, n)
            kw[n] = Segment(**{f: int(getattr(seg, f)) for f in _SEG_FIELDS})
        kw["gdt"] = DTable(int(c.gdt.base), int(c.gdt.limit))
        kw["idt"] = DTable(int(c.idt.base), int(c.idt.limit))
        for n in _CR_NAMES:
            kw[n] = int(getattr(c, n))
        return cls(**kw)

    def _to_c(self, c: Any) -> None:
        for n in _SEG_NAMES:
            seg = getattr(self, n)
            cseg = getattr(c, n)
            for f in _SEG_FIELDS:
                setattr(cseg, f, getattr(seg, f))
        for n in ("gdt", "idt"):
            t = getattr(self, n)
            getattr(c, n).base = t.base
            getattr(c, n).limit = t.limit
        for n in _CR_NAMES:
            setattr(c, n, getattr(self, n))


# The struct-shaped parts of a vCPU's state, in the order they must be restored:
# sregs before regs (mode changes), MSRs after sregs (EFER), events and mp_state last.
STRUCT_PARTS = ("sregs", "regs", "xcrs", "xsave", "fpu", "debugregs", "vcpu_events", "mp_state")


@dataclass(frozen=True)
class VcpuState:
    """Everything needed to continue a vCPU elsewhere.

    ``parts`` maps a part name (see ``STRUCT_PARTS``) to the raw bytes of its KVM
    struct; parts the host did not offer are absent.  ``msrs`` is a tuple of
    ``(index, value)``.  ``to_dict``/``from_dict`` give a msgpack-friendly form.
    """

    index: int
    parts: dict[str, bytes]
    msrs: tuple[tuple[int, int], ...]

    @property
    def regs(self) -> Regs:
        c = ffi.new("struct kvm_regs *")
        ffi.memmove(c, self.parts["regs"], ffi.sizeof("struct kvm_regs"))
        return Regs._from_c(c)

    @property
    def sregs(self) -> Sregs:
        c = ffi.new("struct kvm_sregs *")
        ffi.memmove(c, self.parts["sregs"], ffi.sizeof("struct kvm_sregs"))
        return Sregs._from_c(c)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "parts": dict(self.parts),
            "msrs": [list(m) for m in self.msrs],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VcpuState:
        """Raises ValueError naming the field when ``d`` is malformed."""
        try:
            index = int(d["index"])
            parts = {str(k): bytes(v) for k, v in d["parts"].items()}
            msrs = tuple((int(i), int(v)) for i, v in d["msrs"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed vCPU state record: {exc!r}") from exc
        unknown = set(parts) - set(STRUCT_PARTS)
        if unknown:
            raise ValueError(f"vCPU state has unknown parts {sorted(unknown)}")
        for name in ("regs", "sregs"):
            if name not in parts:
                raise ValueError(f"vCPU state lacks its {name!r} part")
        return cls(index=index, parts=parts, msrs=msrs)

    def replace_regs(self, regs: Regs) -> VcpuState:
        c = ffi.new("struct kvm_regs *")
        regs._to_c(c)
        parts = dict(self.parts)
        parts["regs"] = bytes(ffi.buffer(c))
        return dataclasses.replace(self, parts=parts)
