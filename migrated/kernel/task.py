"""Naming threads for the kernel, so that an operator's ``top -H``, ``ps -L`` and
``/proc/PID/task/TID/comm`` show which thread of a VM process is which (the vCPUs,
the push, the BULK receiver...), and per-thread CPU accounting can be read by name.
Python 3.11 names threads only for itself."""

from __future__ import annotations

from ._util import ffi, lib

__all__ = ["set_thread_name"]


def set_thread_name(name: str) -> None:
    """Name the calling thread (the kernel keeps 15 bytes).  A refusal is ignored: a
    name is a convenience, never a reason to fail."""
    lib.mig_set_thread_name(ffi.new("char[]", name.encode()[:15]))
