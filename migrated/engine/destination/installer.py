"""Installing bulk frames that the event loop received, on a worker thread.

Used when the background push arrives on a connection the loop reads (MAIN, when the
source pushes there, or BULK over TLS, whose connection cannot be lent to a thread):
receiving a frame (a socket copy) and installing it (a second copy into freshly
allocated pages) in sequence on the loop would make a fault wait behind a whole
frame's install.  So the loop receives into a ring of staging buffers and this worker
installs them, while the loop keeps serving faults; urgent answers are installed on
the loop at once.

When every buffer is in flight the loop stops reading that connection (the caller's
job, driven by :meth:`Installer.take_buffer` returning None) until one comes back.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable

from ..ram import staging_buffer
from ..threads import Worker
from .pages import PageStore, Runs

__all__ = ["Installer"]

# (first page, npages, payload or None for zero pages, staging buffer to give back)
_Item = tuple[int, int, memoryview | None, memoryview | None]


class Installer:
    """``on_done(runs)`` runs on the loop after each frame, with the new runs."""

    def __init__(
        self,
        store: PageStore,
        on_done: Callable[[Runs], None],
        on_buffer_free: Callable[[], None],
        *,
        nbuffers: int,
        buffer_nbytes: int,
    ) -> None:
        self.store = store
        self._on_done = on_done
        self._on_buffer_free = on_buffer_free
        self._loop = asyncio.get_running_loop()
        self.nbuffers = nbuffers
        self._free = [staging_buffer(buffer_nbytes) for _ in range(nbuffers)]
        self._free_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self.worker = Worker(
            "migrated-installer", self._work, on_stop=lambda: self._queue.put(None)
        )

    def start(self) -> None:
        self.worker.start()

    def take_buffer(self) -> memoryview | None:
        """A free staging buffer, or None when every one is in flight."""
        with self._free_lock:
            return self._free.pop() if self._free else None

    @property
    def buffers_free(self) -> int:
        with self._free_lock:
            return len(self._free)

    def submit(
        self, page: int, npages: int, data: memoryview | None, buf: memoryview | None
    ) -> None:
        """Queue a frame (``data`` None: zero pages) held in staging ``buf``.  Raises
        the worker's failure if it has failed."""
        if self.worker.done.done():
            self.worker.done.result()  # raises what the worker raised
        self._queue.put((page, npages, data, buf))

    async def close(self) -> None:
        """Install what is queued, then end the worker and join it."""
        self._queue.put(None)
        await self.worker.join()

    def _work(self, worker: Worker) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            page, npages, data, buf = item
            new = self.store.install(page, npages, data)
            if buf is not None:
                with self._free_lock:
                    self._free.append(buf)
                self._loop.call_soon_threadsafe(self._on_buffer_free)
            self._loop.call_soon_threadsafe(self._on_done, new)
