"""Host conditions shared by the benchmarks: free page reporting and memory warm-up.

This sandbox is a Firecracker microVM whose kernel reports free memory back to its
host (virtio-balloon free page reporting, ``page_reporting_order``).  A page that was
free for a while is then unbacked, and the first write to it after reallocation takes
a host fault; on a destination that write happens inside UFFDIO_COPY, which then runs
at ~1 GB/s instead of ~4 GB/s.  A hypervisor host does not give its memory back like
that, so benchmarks turn reporting off for their run (:func:`disable_page_reporting`),
touch as much memory as they will allocate (:func:`warm_host_memory`) and restore the
setting afterwards.  The output must say which was measured.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPORTING = Path("/sys/module/page_reporting/parameters/page_reporting_order")


def disable_page_reporting() -> str | None:
    """Returns the previous order, or None when the knob is absent or read-only.
    Order 11 is above the buddy allocator's maximum: nothing is reported."""
    try:
        old = REPORTING.read_text().strip()
        REPORTING.write_text("11")
    except OSError:
        return None
    return old


def restore_page_reporting(old: str | None) -> None:
    if old is not None:
        REPORTING.write_text(old)


def warm_host_memory(nbytes: int) -> float:
    """Touch ``nbytes`` of fresh memory and free it, so the kernel's free lists hold
    pages the host backs.  Returns the seconds it took."""
    t = time.perf_counter()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, nbytes, mmap.PAGESIZE):
        m[off] = 1
    m.close()
    return time.perf_counter() - t


def describe(old_order: str | None) -> str:
    if old_order is None:
        return "as the host has it"
    return f"off for the run (was order {old_order}), memory warmed"


def run_with_reporting_off(main: Callable[[], Coroutine[Any, Any, T]]) -> tuple[T, str]:
    """Run ``main()`` on uvloop with free page reporting off (restored afterwards, also
    when it raises); returns its result and :func:`describe` of what was measured."""
    import uvloop

    old = disable_page_reporting()
    try:
        return uvloop.run(main()), describe(old)
    finally:
        restore_page_reporting(old)


def load_1m() -> float:
    return os.getloadavg()[0]
