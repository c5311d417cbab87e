"""An outgoing migration, owned by the VM host process, followed by any number of clients.

The migration task belongs to the :class:`~migrated.service.vmhost.VmHost`'s TaskGroup,
not to the control-socket client that asked for it: a client that goes away (or a
``migrated send`` that gives up waiting) leaves the migration running.  Clients
*follow* it (:meth:`Outgoing.follow`): they get its events, and its outcome — or, when
postcopy stays paused longer than they are willing to wait (``recovery_timeout_s``),
:class:`PostcopyPaused` (exit 3) while the migration keeps reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from migrated.engine import SourceEngine
from migrated.engine.stats import MigrationStats
from migrated.errors import MigratedError, PostcopyPaused, VmStateUnknown
from migrated.protocol.state import MigrationState

__all__ = ["Outgoing"]

log = logging.getLogger(__name__)
Emit = Callable[[dict[str, Any]], None]
S = MigrationState


class Outgoing:
    """``engine`` running in ``task``; ``broadcast`` is the engine's emit."""

    def __init__(self, engine: SourceEngine, control_path: str) -> None:
        self.engine = engine
        self.control_path = control_path
        self.task: asyncio.Task[Any] | None = None
        #: The outcome, once the task has ended: statistics or the error.
        self.stats: MigrationStats | None = None
        self.error: MigratedError | None = None
        self._followers: set[Emit] = set()
        self._changed = asyncio.Event()

    def broadcast(self, event: dict[str, Any]) -> None:
        for emit in list(self._followers):
            emit(event)
        if event.get("event") in ("state", "recovered", "recovery-failed"):
            self._changed.set()

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def committed(self) -> bool:
        return self.engine.session.point_of_no_return

    async def follow(self, emit: Emit, *, wait_paused_s: float) -> MigrationStats:
        """Stream events to ``emit`` until the migration ends; returns its statistics
        or raises its MigrationAborted.  Raises PostcopyPaused once postcopy has been
        paused for ``wait_paused_s`` (the migration goes on)."""
        assert self.task is not None
        self._followers.add(emit)
        started = time.monotonic()
        try:
            while not self.task.done():
                self._changed.clear()
                paused_since = self.engine.paused_since
                timeout = None
                if paused_since is not None:
                    # This follower waits wait_paused_s from when it started watching
                    # (a second `send` on a paused migration gets its own window).
                    waiting_since = max(paused_since, started)
                    timeout = waiting_since + wait_paused_s - time.monotonic()
                    if timeout <= 0:
                        raise self._paused_error(time.monotonic() - paused_since)
                changed = asyncio.create_task(self._changed.wait())
                try:
                    await asyncio.wait(
                        [self.task, changed], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    changed.cancel()
            if self.error is not None:
                raise self.error
            if self.stats is None:
                raise VmStateUnknown(
                    "the migration task ended without an outcome (a bug in migrated; see "
                    "the VM process's log)"
                )
            return self.stats
        finally:
            self._followers.discard(emit)

    def _paused_error(self, paused_s: float) -> PostcopyPaused:
        eng = self.engine
        reason = eng.session.lost_reason or "the link to the destination was lost"
        return PostcopyPaused(
            f"postcopy paused for {paused_s:.0f} s on the source: {reason}. The VM runs on "
            f"the destination ({eng.host}:{eng.port}); this source keeps its paused copy and "
            "keeps reconnecting",
            hint=(
                "do NOT restart the VM here. Once the link is back run `migrated recover "
                f"--control {self.control_path}` (add `--to HOST:PORT` if the destination "
                "moved) or the same `migrated send` again"
            ),
        )
