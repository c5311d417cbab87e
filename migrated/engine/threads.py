"""Threads with an owner (trio's rule): started, stopped and joined by one object.

A :class:`Worker` runs ``target(worker)`` on its own thread.  Its owner awaits
:meth:`Worker.join` (which never blocks the event loop) before releasing anything the
thread uses — guest memory above all: a push thread that outlived ``Machine.close()``
once read unmapped memory and crashed the source.  ``stop()`` asks the thread to end
(``worker.stopping`` becomes true and ``on_stop`` runs, e.g. to shut a socket down so a
blocked call returns).  What the target raises is re-raised by ``join``.

Use it as ``async with Worker(...) as w:`` or call ``stop()``/``join()`` yourself; the
context manager stops and joins on the way out, whatever happened.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from migrated.errors import MigratedError
from migrated.kernel import set_thread_name

__all__ = ["Worker"]

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        name: str,
        target: Callable[[Worker], Any],
        *,
        on_stop: Callable[[], None] | None = None,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.nice = nice
        #: Called by stop() too, set by the target while it runs something to wake
        #: (a C loop's interrupt).
        self.on_interrupt: Callable[[], None] | None = None
        self._target = target
        self._on_stop = on_stop
        self._stop = threading.Event()
        self._loop = asyncio.get_running_loop()
        #: Resolves on the loop when the thread has ended: its result or exception.
        self.done: asyncio.Future[Any] = self._loop.create_future()
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait_stopping(self, timeout_s: float) -> bool:
        """For the thread: sleep up to ``timeout_s``; True if asked to stop meanwhile."""
        return self._stop.wait(timeout_s)

    def start(self) -> Worker:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to end (any thread; idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        wake = self.on_interrupt
        if wake is not None:
            wake()
        if self._on_stop is not None:
            self._on_stop()

    async def join(self) -> Any:
        """Wait for the thread to end (never blocking the loop); returns what the
        target returned or raises what it raised.  Not started: returns None."""
        if self._thread.ident is None:
            return None
        return await asyncio.shield(self.done)

    def _main(self) -> None:
        set_thread_name(self.name)  # what top -H and per-thread accounting show
        if self.nice:
            # Lower this thread's priority only (Linux: a thread is a task); raising it
            # back would need privileges, lowering never does.
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except OSError as exc:
                log.info("thread %s keeps its priority: %s", self.name, exc)
        try:
            result = self._target(self)
        except BaseException as exc:
            self._resolve(None, exc)
        else:
            self._resolve(result, None)

    def _resolve(self, result: Any, exc: BaseException | None) -> None:
        def settle() -> None:
            if self.done.done():
                return
            if exc is not None:
                self.done.set_exception(exc)
            else:
                self.done.set_result(result)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: the process is going away
            log.warning("thread %s ended after its event loop closed", self.name)

    async def __aenter__(self) -> Worker:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        try:
            self.stop()
        except Exception:
            if exc[0] is None:
                raise
            # Never let a failing wake-up replace the owner's exception (a
            # cancellation above all): the join below still waits for the thread.
            log.warning("stopping thread %s failed", self.name, exc_info=True)
        try:
            await self.join()
        except Exception as failure:
            if exc[0] is None:
                raise
            # The owner's own failure is what propagates; the thread's is logged: a
            # network error as one line (it is the same story), anything else in full.
            if isinstance(failure, MigratedError):
                log.info("thread %s ended with its owner: %s", self.name, failure)
            else:
                log.warning(
                    "thread %s failed while its owner was failing", self.name, exc_info=True
                )
