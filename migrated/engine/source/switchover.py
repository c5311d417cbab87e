"""The switchover: pause, final pages or discards, device state, Ready, Commit.

Order on MAIN (docs/protocol.md §6): ``Switchover`` → stale pages as ``Discard`` /
``DiscardBitmap`` (postcopy, hybrid) or every page not yet current (precopy mode) →
the VMM area that must be resident before a vCPU runs → ``VmState``.  Then the source
waits for the destination's ``Ready`` and answers ``Commit``: the point of no return.

Until ``Commit`` is sent the destination cannot run the guest, so any failure here —
a dead link, an Error, no Ready within ``ready_timeout_s``, a local error — is safe to
undo: the caller resumes the VM on the source.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from migrated.errors import LinkLost
from migrated.kernel import PageBitmap
from migrated.protocol import Commit, Discard, DiscardBitmap, Switchover, VmState

from ..options import Mode
from ..ram import PAGE_SIZE
from ..stats import StepTimer
from .precopy import send_bitmap, settle

if TYPE_CHECKING:
    from .engine import SourceEngine

__all__ = ["switch_over"]

# Above this many stale runs, one DiscardBitmap frame is cheaper than Discards.
_MAX_DISCARD_FRAMES = 32


async def switch_over(eng: SourceEngine) -> None:
    """Everything from the pause to the Commit.  Returns once Commit is written;
    raises on any failure before that (the VM is then paused or running: the caller
    resumes it)."""
    opts, stats = eng.opts, eng.stats
    if opts.mode is not Mode.POSTCOPY:
        await settle(eng)
    eng.check_interrupts(allow_switch=False)
    eng.downtime_t0 = time.monotonic()
    mark = StepTimer(stats.downtime_breakdown_ms).mark
    await asyncio.to_thread(eng.machine.pause)
    eng.paused = True
    mark("pause")
    stale = eng.stale
    if eng.dirty_log.enabled:
        # Logging stays on: switching it off rewrites the memslots (milliseconds of
        # downtime), and the paused VM is destroyed on success anyway.  An abort
        # switches it off before resuming the VM.
        stale.or_count_new(eng.dirty_log.fetch())
    mark("final-dirty-sync")
    eng.link.send_main(Switchover())
    eng.state_changed()
    if opts.mode is Mode.PRECOPY:
        # Classic: everything not current on the destination goes now, VM paused.
        todo = PageBitmap(eng.ram.total_pages)
        todo.fill()
        current = eng.cursor.sent.copy()
        current.andnot(stale)
        todo.andnot(current)
        stats.downtime_bytes += await send_bitmap(eng, todo, precopy=False)
    else:
        stale_sent = stale.copy()
        with eng.cursor.lock:
            unsent = stale.copy()
            unsent.andnot(eng.cursor.sent)
        stale_sent.andnot(unsent)  # stale & sent: the destination holds an old copy
        _send_discards(eng, stale_sent)
        stats.discarded_pages = stale_sent.count()
        eng.cursor.unmark(stale_sent)
    mark("discards-or-final-pages")
    stats.downtime_bytes += await _send_resident(eng)
    mark("resident-pages")
    blob = eng.machine.capture_state().to_bytes()
    mark("capture-state")
    eng.link.send_main(VmState(memoryview(blob)))
    stats.downtime_bytes += len(blob)
    eng.state_changed()
    ready = eng.answers.ready
    await eng.until(ready, timeout_s=opts.ready_timeout_s, what="the destination's Ready")
    mark("wait-ready")
    eng.state_changed()
    # What the destination holds now, in case it never receives the Commit: a
    # reconnect answered by Ready resumes the push from here (docs/protocol.md §7).
    eng.sent_at_commit = eng.cursor.sent.copy()
    eng.link.send_main(Commit())  # the point of no return
    eng.commit_t = time.monotonic()
    mark("commit")
    eng.log.event("switchover", "committed the VM to the destination (Commit sent)")
    eng.state_changed()


def _send_discards(eng: SourceEngine, stale: PageBitmap) -> None:
    """Tell the destination to drop ``stale``: a few Discard runs, or one DiscardBitmap
    frame when the set is scattered (per-frame cost dominates)."""
    runs: list[tuple[int, int]] = []
    for page, n in stale.runs(True, 1 << 16):
        runs.extend(eng.ram.split(page, n, 1 << 16))
        if len(runs) > _MAX_DISCARD_FRAMES:
            eng.link.send_main(DiscardBitmap(memoryview(stale.data)))
            return
    for p, m in runs:
        eng.link.send_main(Discard(eng.ram.gpa_of_page(p), m))


async def _send_resident(eng: SourceEngine) -> int:
    """Send the pages the destination must have before any vCPU runs (see
    ``Machine.resident_ranges``) unless they are already there and current."""
    todo = PageBitmap(eng.ram.total_pages)
    for gpa, size in eng.machine.resident_ranges():
        todo.set(eng.ram.page_of_gpa(gpa), size // PAGE_SIZE)
    with eng.cursor.lock:
        todo.andnot(eng.cursor.sent)
    if eng.link.main is None:
        raise LinkLost("MAIN closed during the switchover")
    return await send_bitmap(eng, todo, precopy=False)
