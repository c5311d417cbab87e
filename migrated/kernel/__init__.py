"""The kernel layer: the only code in migrated that touches cffi.

Callers get typed objects: :class:`Kvm`/:class:`Vm`/:class:`Vcpu` for KVM,
:class:`Userfaultfd` for missing-page faults, :class:`GuestMemory` for guest RAM and
:class:`PageBitmap` for page bookkeeping, and the bulk page loops in C
(:class:`PageMap` + :class:`AcceleratedReceiver` on a destination, :class:`PushLoop`
on a source).  Kernel failures are ``OSError`` with a
sentence naming the call; expected races are results (``CopyResult.already_present``,
``PreFaultResult.supported``).
"""

from .bitmap import PageBitmap, find_zero_pages, page_is_zero
from .kvm import Cap, ExitReason, Kvm, PreFaultResult, Vcpu, VcpuExit, Vm
from .memory import Backing, GuestMemory
from .pagefeed import AcceleratedReceiver, ProtocolHooks, Reason, Received
from .pagemap import InstallResult, MappedRegion, PageMap
from .pushloop import PushLoop, TxEvent, TxStats
from .recvloop import ReceiveLoop, RxEvent, RxStats
from .regs import DTable, Regs, Segment, Sregs, VcpuState
from .task import set_thread_name
from .uffd import CopyResult, FaultEvent, UffdEventKind, UffdFeature, Userfaultfd

__all__ = [
    "AcceleratedReceiver",
    "Backing",
    "Cap",
    "CopyResult",
    "DTable",
    "ExitReason",
    "FaultEvent",
    "GuestMemory",
    "InstallResult",
    "Kvm",
    "MappedRegion",
    "PageBitmap",
    "PageMap",
    "PreFaultResult",
    "ProtocolHooks",
    "PushLoop",
    "Reason",
    "ReceiveLoop",
    "Received",
    "Regs",
    "RxEvent",
    "RxStats",
    "Segment",
    "Sregs",
    "TxEvent",
    "TxStats",
    "UffdEventKind",
    "UffdFeature",
    "Userfaultfd",
    "Vcpu",
    "VcpuExit",
    "VcpuState",
    "Vm",
    "find_zero_pages",
    "page_is_zero",
    "set_thread_name",
]
