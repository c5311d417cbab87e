"""Whether this destination can host the VM a ``Setup`` describes, before anything is
allocated: the embedded VMM's limits, the operator's limits, and memory admission."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from migrated.errors import ResourceError
from migrated.protocol import ErrorCode, Setup
from migrated.vmm.admission import Reservation, admit, reserve

from ..options import RecvOptions
from ..ram import PAGE_SIZE

__all__ = ["Admit", "admit_memory", "check_setup", "default_admission"]


Admit = Callable[[int], "Reservation | None"]


def check_setup(s: Setup, opts: RecvOptions) -> tuple[str, str] | None:
    """None when the VM can be hosted, else ``(error code, sentence)`` naming every
    reason (``unsupported-vm``)."""
    ram_bytes = sum(r.nbytes for r in s.layout.regions)
    problems = []
    if ram_bytes > opts.max_ram_bytes:
        problems.append(
            f"{ram_bytes} bytes of RAM exceed this host's limit of {opts.max_ram_bytes}"
        )
    if not 1 <= s.vcpu_count <= opts.max_vcpus:
        problems.append(f"{s.vcpu_count} vCPUs (this host runs 1..{opts.max_vcpus})")
    if len(s.layout.regions) != 1 or s.layout.regions[0].gpa != 0:
        problems.append("only one RAM region at GPA 0 is supported")
    if any(r.page_size != PAGE_SIZE for r in s.layout.regions):
        problems.append("only 4 KiB pages are supported (both sides must agree)")
    if problems:
        return ErrorCode.UNSUPPORTED_VM, "cannot host this VM: " + "; ".join(problems)
    return None


async def admit_memory(
    s: Setup, opts: RecvOptions, admit: Admit | None
) -> tuple[Reservation | None, tuple[str, str] | None]:
    """Memory admission for the guest of ``s`` (off the loop: reserving fills memory).
    Returns the reservation (or None) and, when refused, ``(insufficient-memory,
    sentence naming needed vs available and the limit)``."""
    ram_bytes = sum(r.nbytes for r in s.layout.regions)
    if admit is None:
        return None, None
    try:
        return await asyncio.to_thread(admit, ram_bytes), None
    except ResourceError as exc:
        return None, (ErrorCode.INSUFFICIENT_MEMORY, str(exc))


def default_admission(name: str, opts: RecvOptions) -> Admit:
    """Check (and with ``opts.reserve_memory`` hold) memory for VM ``name``."""

    def admit_guest(nbytes: int) -> Reservation | None:
        what = f"the incoming VM {name!r}"
        if opts.reserve_memory:
            return reserve(nbytes, headroom_bytes=opts.memory_headroom_bytes, what=what)
        admit(nbytes, headroom_bytes=opts.memory_headroom_bytes, what=what)
        return None

    return admit_guest
