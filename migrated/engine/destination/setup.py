"""Whether this destination can host the VM a ``Setup`` describes, before anything is
allocated: the embedded VMM's limits, the operator's limits, and memory admission."""

from __future__ import annotations

from collections.abc import Callable

from migrated.errors import ResourceError
from migrated.protocol import ErrorCode, Setup

from ..options import RecvOptions
from ..ram import PAGE_SIZE

__all__ = ["check_setup"]


def check_setup(
    s: Setup, opts: RecvOptions, admit: Callable[[int], None] | None
) -> tuple[str, str] | None:
    """None when the VM can be hosted, else ``(error code, sentence)`` naming every
    reason (``unsupported-vm``) or the memory shortfall (``insufficient-memory``)."""
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
    if admit is not None:
        try:
            admit(ram_bytes)
        except ResourceError as exc:
            return ErrorCode.INSUFFICIENT_MEMORY, str(exc)
    return None
