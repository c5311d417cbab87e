"""What the two C page loops (:class:`PushLoop`, :class:`ReceiveLoop`) share: one C
handle (``struct mig_tx`` / ``struct mig_rx``) used by the thread that runs it and by
any thread that interrupts it.

Facts we rely on:

* ``run()`` holds ``_busy`` for the whole C call (GIL released); ``close()`` refuses
  while it is held: the owner joins the running thread before closing.
* The any-thread calls (``interrupt``, ``PushLoop.jump``) touch the handle only under
  ``_guard`` and do nothing once it is freed; ``close()`` frees it under ``_guard``.
  So none of them can write into freed memory (the ``stop --force`` crash).
* The C handle has ``interrupt`` and ``wake_fd`` (an eventfd the loop polls).
* After ``close()`` the statistics are the final ones, read just before freeing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Self

__all__ = ["CLoop"]


class CLoop:
    """Owner of one C loop handle, freed by ``free``; ``what`` names it in errors."""

    def __init__(self, handle: Any, free: Callable[[Any], None], what: str) -> None:
        self._handle: Any = handle
        self._free = free
        self._what = what
        self._busy = threading.Lock()
        self._guard = threading.Lock()
        self._final: Any = None

    def _live(self) -> Any:
        if self._handle is None:
            raise ValueError(f"{self._what} is closed")
        return self._handle

    @property
    def stats(self) -> Any:
        raise NotImplementedError

    def interrupt(self) -> None:
        """Make a running (or the next) ``run()`` return INTERRUPTED soon.  Any thread;
        a no-op once the loop is closed (there is nothing left to interrupt)."""
        with self._guard:
            handle = self._handle
            if handle is None:
                return
            handle.interrupt = 1
            os.eventfd_write(int(handle.wake_fd), 1)

    def _released(self) -> None:
        """After the handle is freed: drop what only it used."""

    def close(self) -> None:
        """Free the loop (idempotent).  Raises RuntimeError while ``run()`` runs."""
        if self._handle is None:
            return
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("close() while run() is in progress: join its thread first")
        try:
            self._final = self.stats
            with self._guard:
                self._free(self._handle)
                self._handle = None
            self._released()
        finally:
            self._busy.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
