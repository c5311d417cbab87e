"""Installing received pages into registered guest RAM, on two threads.

Facts we rely on:

* After userfaultfd registration guest RAM is written only by UFFDIO_COPY and
  UFFDIO_ZEROPAGE.  Both may be issued from any thread; neither touches guest memory
  from user space, so neither can block on a missing page.
* Receiving a frame (a socket copy) and installing it (a second copy into freshly
  allocated pages) are the two big costs of the destination.  Done in sequence on the
  event loop they cap throughput near 2 GB/s here and make a fault wait behind up to a
  whole bulk frame's install.  So bulk frames are installed by one worker thread,
  while the loop keeps receiving and serving faults; urgent pages (answers to faults)
  are installed on the loop at once.
* Both paths copy *outside* the lock and account *under* it: a page installed by both
  (the push and an urgent answer raced) is counted once, and the loser's EEXIST is the
  kernel telling us so (CopyResult.already_present), followed by UFFDIO_WAKE in case
  its waiter slept on the other copy.
* Bulk frames land in a ring of staging buffers.  When all are in flight, reading the
  bulk channel pauses (the caller's job, driven by :meth:`take_buffer` returning None).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable

from migrated.kernel import PageBitmap, Userfaultfd

from .ram import PAGE_SIZE, GuestRam, staging_buffer

__all__ = ["PageInstaller"]

Runs = list[tuple[int, int]]
# (first page, npages, payload, staging buffer to give back)
_Item = tuple[int, int, memoryview, memoryview]
#: called on the event loop after a bulk frame was installed, with the new runs
BulkDone = Callable[[Runs], None]


class PageInstaller:
    def __init__(
        self,
        ram: GuestRam,
        received: PageBitmap,
        uffd: Userfaultfd,
        on_bulk_done: BulkDone,
        *,
        nbuffers: int,
        buffer_nbytes: int,
    ) -> None:
        self.ram = ram
        self.received = received
        self.uffd = uffd
        self.lock = threading.Lock()
        self.install_s = 0.0
        self.duplicate_pages = 0
        self._on_bulk_done = on_bulk_done
        self._loop = asyncio.get_running_loop()
        self._free = [staging_buffer(buffer_nbytes) for _ in range(nbuffers)]
        self._free_lock = threading.Lock()  # the worker gives buffers back
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="migrated-installer", daemon=True)
        self._thread.start()

    # -- the loop's side ---------------------------------------------------------------

    def take_buffer(self) -> memoryview | None:
        """A free staging buffer, or None when every one is in flight (the loop then
        pauses reading)."""
        with self._free_lock:
            return self._free.pop() if self._free else None

    def _give_back(self, buf: memoryview) -> None:
        with self._free_lock:
            self._free.append(buf)

    @property
    def failure(self) -> BaseException | None:
        """What the worker raised, if anything (the migration cannot go on)."""
        return self._failure

    @property
    def buffers_free(self) -> int:
        return len(self._free)

    def submit(self, page: int, npages: int, data: memoryview, buf: memoryview) -> None:
        """Queue a bulk frame (``data`` None: zero pages) held in staging ``buf``.
        Raises the worker's failure, if it had one."""
        if self._failure is not None:
            raise self._failure
        self._queue.put((page, npages, data, buf))

    def install(self, page: int, npages: int, data: memoryview | None) -> Runs:
        """Install the not-yet-received pages of a run now (any thread); returns the
        runs this call newly accounted."""
        with self.lock:
            todo = self._missing_runs(page, npages)
        new: Runs = []
        for i, n in todo:
            t = time.monotonic()
            addr = self.ram.host_address(i)
            if data is None:
                r = self.uffd.zeropage(addr, n * PAGE_SIZE)
            else:
                off = (i - page) * PAGE_SIZE
                r = self.uffd.copy(addr, data[off : off + n * PAGE_SIZE], n * PAGE_SIZE)
            if r.already_present:
                self.uffd.wake(addr, n * PAGE_SIZE)
            elapsed = time.monotonic() - t
            with self.lock:
                self.install_s += elapsed
                self.duplicate_pages += r.already_present // PAGE_SIZE
                new.extend(self._mark_runs(i, n))
        with self.lock:
            self.duplicate_pages += npages - sum(n for _, n in todo)
        return new

    def close(self) -> None:
        """Stop the worker after the queued frames (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    # -- bookkeeping (callers hold the lock) --------------------------------------------

    def _missing_runs(self, page: int, npages: int) -> Runs:
        return self.received.runs_within(page, npages, False)

    def _mark_runs(self, page: int, npages: int) -> Runs:
        """Set the bits; returns the sub-runs that were newly set."""
        new = self._missing_runs(page, npages)
        self.received.set(page, npages)
        return new

    # -- the worker ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            page, npages, data, buf = item
            try:
                new = self.install(page, npages, data)
            except BaseException as exc:  # reported to the loop via submit()
                self._failure = exc
                new = []
            self._give_back(buf)
            try:
                self._loop.call_soon_threadsafe(self._on_bulk_done, new)
            except RuntimeError:
                return  # the loop is closed: the process is going away
