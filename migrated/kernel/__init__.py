"""The kernel layer: the only code in migrated that touches cffi.

Callers get typed objects: :class:`Kvm`/:class:`Vm`/:class:`Vcpu` for KVM,
:class:`Userfaultfd` for missing-page faults, :class:`GuestMemory` for guest RAM and
:class:`PageBitmap` for page bookkeeping.  Kernel failures are ``OSError`` with a
sentence naming the call; expected races are results (``CopyResult.already_present``,
``PreFaultResult.supported``).
"""

from .bitmap import PageBitmap, find_zero_pages, page_is_zero
from .kvm import Cap, ExitReason, Kvm, PreFaultResult, Vcpu, VcpuExit, Vm
from .memory import Backing, GuestMemory
from .regs import DTable, Regs, Segment, Sregs, VcpuState
from .uffd import CopyResult, FaultEvent, UffdEventKind, UffdFeature, Userfaultfd

__all__ = [
    "Backing",
    "Cap",
    "CopyResult",
    "DTable",
    "ExitReason",
    "FaultEvent",
    "GuestMemory",
    "Kvm",
    "PageBitmap",
    "PreFaultResult",
    "Regs",
    "Segment",
    "Sregs",
    "UffdEventKind",
    "UffdFeature",
    "Userfaultfd",
    "Vcpu",
    "VcpuExit",
    "VcpuState",
    "Vm",
    "find_zero_pages",
    "page_is_zero",
]
