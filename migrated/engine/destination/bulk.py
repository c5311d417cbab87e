"""The destination's BULK receiver: receive pushed frames and install them, one thread.

The loop accepts the BULK connection and lends its socket to this thread
(``Link.lend``).  Where it can, the thread hands the stream to the kernel layer's C
receive loop (:class:`~migrated.kernel.AcceleratedReceiver`): every fast-shaped
``Pages``/``ZeroPages`` frame is received, checked against the layout and installed
through the store's :class:`~migrated.kernel.PageMap` without returning to Python,
and everything else goes, byte for byte, to the sans-IO Connection (so every limit
and error is the protocol's own).  Over TLS, with checksums, or with a page map that
is not the kernel's (tests), it decodes in Python through the BlockingChannel.
Either way each installed run is reported to the loop, which answers waiting faults.

Receiving and installing run in series on this one thread: a second busy thread
measured slower on the two-core hosts this project runs on.  The thread runs at a
lower priority (nice +10) so the guest's vCPUs and the event loop's fault service win
the CPU when they want it.

A clean end of the stream at a frame boundary is the source finishing its push; any
other end is not link loss by itself (MAIN's heartbeat decides that).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from migrated.errors import LinkLost, RemoteProtocolError
from migrated.kernel import AcceleratedReceiver, PageMap, ProtocolHooks, Reason
from migrated.protocol import (
    MAX_HEADER_NBYTES,
    NEED_DATA,
    ConnectionClosed,
    Error,
    Pages,
    Progress,
    ZeroPages,
)
from migrated.transport.blocking import BlockingChannel
from migrated.transport.net import map_error

from ..ram import PAGE_SIZE, staging_buffer
from ..threads import Worker
from .pages import PageStore, Runs

__all__ = ["BulkReceiver"]

HOOKS = ProtocolHooks(Pages, ZeroPages, NEED_DATA, ConnectionClosed, MAX_HEADER_NBYTES)
_BATCH_NBYTES = 16 << 20
_IDLE_S = 1.0


class BulkReceiver:
    """``on_installed(runs)`` runs on the loop after frames installed pages."""

    def __init__(
        self,
        bc: BlockingChannel,
        store: PageStore,
        on_installed: Callable[[Runs], None],
        *,
        max_frame_nbytes: int,
        accelerated: bool = True,
    ) -> None:
        self.bc, self.store = bc, store
        self._accelerate = accelerated
        self._on_installed = on_installed
        self._loop = asyncio.get_running_loop()
        self._max_frame_nbytes = max_frame_nbytes
        self.accelerated = False
        self.normal_pages = 0
        self.zero_pages = 0
        self.worker = Worker("migrated-bulk", self._run, on_stop=bc.stop, nice=10)

    def _report(self, runs: Runs) -> None:
        if runs:
            self._loop.call_soon_threadsafe(self._on_installed, runs)

    def _run(self, worker: Worker) -> None:
        usable = (
            self._accelerate
            and isinstance(self.store.pagemap, PageMap)
            and not isinstance(self.bc.sock, ssl.SSLSocket)
            and self.bc.conn.checksum is None
        )
        try:
            if usable:
                self._run_accelerated(worker)
            else:
                self._run_python(worker)
        except OSError as exc:  # the kernel layer's loops raise the socket's own errors
            if worker.stopping:
                return
            raise map_error(exc, f"the BULK connection to {self.bc.peer}") from exc

    # -- the C receive loop -----------------------------------------------------------

    def _run_accelerated(self, worker: Worker) -> None:
        bc, store = self.bc, self.store
        assert isinstance(store.pagemap, PageMap)
        rx = AcceleratedReceiver(bc.sock, bc.conn, store.pagemap, HOOKS)
        rx.loop.watch(store.wanted)
        worker.on_interrupt = rx.interrupt  # stop() wakes the C loop, as the push's
        self.accelerated = True
        normal = 0
        try:
            while not worker.stopping:
                got = rx.receive(batch_nbytes=_BATCH_NBYTES, timeout_s=_IDLE_S)
                stats = rx.loop.stats
                if got.runs:
                    store.installed(got.runs)
                    self._report(got.runs)
                self.normal_pages = stats.normal_pages + rx.python_pages
                self.zero_pages = stats.zero_pages
                store.took_bytes((self.normal_pages - normal) * PAGE_SIZE)
                normal = self.normal_pages
                bc.session.add_payload_bytes(bc.conn, stats.bytes - bc.bytes_received)
                bc.bytes_received = stats.bytes
                for event in got.events:  # decoded by the Connection: the session's too
                    if self._other(bc.session.receive(bc.conn, event)):
                        return
                if got.reason is Reason.EOF:
                    return
        finally:
            final = rx.loop.stats
            store.installed(
                [], duplicates=final.skipped_pages + final.present_pages, install_s=final.install_s
            )
            worker.on_interrupt = None
            rx.close()

    # -- decoding in Python -------------------------------------------------------------

    def _run_python(self, worker: Worker) -> None:
        bc, store = self.bc, self.store
        staging = staging_buffer(self._max_frame_nbytes)

        def sink(header: Any) -> memoryview | None:
            if isinstance(header, Pages):
                return staging[: header.npages * PAGE_SIZE]
            return None

        bc.conn.set_payload_sink(sink)
        for event in bc.events():
            if isinstance(event, Pages | ZeroPages):
                page = store.ram.page_of_gpa(event.gpa)
                data = event.data if isinstance(event, Pages) else None
                self._report(store.install(page, event.npages, data))
                if data is None:
                    self.zero_pages += event.npages
                else:
                    self.normal_pages += event.npages
            elif self._other(event):
                return
            if worker.stopping:
                return

    def _other(self, event: Any) -> bool:
        """A frame that is not pages; True when the stream ended cleanly."""
        if isinstance(event, ConnectionClosed):
            return True
        if isinstance(event, Error):
            raise LinkLost(f"the source ended the BULK connection: {event.message}")
        if not isinstance(event, Progress):
            raise RemoteProtocolError(f"unexpected {type(event).__name__} on BULK")
        return False
