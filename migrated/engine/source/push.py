"""What has been sent, and the background push of the rest.

:class:`PushCursor` is the one record of what the destination has (or will have) of
each page: the *sent* bitmap, plus where the background push continues.  The urgent
path (on the loop) marks what it answers and asks the push to jump just past it
(QEMU's locality rule: the guest will likely touch what follows).  Two pushers use it
the same way: :func:`push_thread` on a BULK connection, and :func:`push_on_main` on the
loop when the destination refused BULK.

Facts we rely on:

* After the commit the source VM is paused: every copy of a page is identical, so a
  page pushed twice (raced by an urgent answer) is harmless, and BULK needs no
  ordering with MAIN or URGENT.
* :meth:`PushCursor.claim` marks a run sent *before* it is sent.  A failure halfway
  leaves pages marked that never arrived; recovery replaces the bitmap with the
  destination's received bitmap, which is the truth.
* The push thread reads guest memory; its owner joins it before the memory goes away.
* Over plain TCP without checksums the thread hands the socket to the kernel layer's
  C push loop (after the Python handshake), which claims from the same sent bitmap
  (atomic, shared with the urgent path) and honours jumps at once.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from dataclasses import dataclass

from migrated.errors import LinkLost, PeerRefused
from migrated.kernel import PageBitmap, PageMap, PushLoop, TxEvent
from migrated.protocol import Error, Pages, Welcome, ZeroPages
from migrated.transport.blocking import BlockingChannel
from migrated.transport.link import Link
from migrated.transport.net import map_error

from ..ram import PAGE_SIZE, GuestRam
from ..stats import Pacer
from ..threads import Worker

__all__ = ["PushCounters", "PushCursor", "push_on_main", "push_thread"]

_BATCH_NBYTES = 4 << 20
_IDLE_S = 0.5


class PushCursor:
    """The sent bitmap and the push position.  Thread-safe."""

    def __init__(self, total_pages: int) -> None:
        self.total_pages = total_pages
        self.sent = PageBitmap(total_pages)
        self.lock = threading.Lock()
        self._cursor = 0
        self._wrapped = False
        self._jump: int | None = None
        #: The C push loop while one runs (jumps go to it at once).
        self.loop: PushLoop | None = None

    def claim(self, max_pages: int) -> tuple[int, int] | None:
        """The next unsent run (at most ``max_pages``), marked sent; None when every
        page is sent."""
        with self.lock:
            while True:
                if self._jump is not None:
                    self._cursor, self._jump, self._wrapped = self._jump, None, False
                page, n = self.sent.find_run(self._cursor, False, max_pages)
                if page >= 0:
                    self.sent.set(page, n)
                    self._cursor = page + n
                    return page, n
                if self._wrapped or self._cursor == 0:
                    return None
                self._cursor, self._wrapped = 0, True

    def mark(self, page: int, npages: int) -> None:
        with self.lock:
            self.sent.set(page, npages)

    def unmark(self, stale: PageBitmap) -> None:
        """Pages sent earlier but dirtied since (switchover discards)."""
        with self.lock:
            self.sent.andnot(stale)

    def jump(self, page: int) -> None:
        """Continue the push at ``page`` (locality after an urgent request)."""
        if page < self.total_pages:
            self._jump = page
            loop = self.loop
            if loop is not None:
                loop.jump(page)

    def reset(self, received: PageBitmap) -> None:
        """After recovery: the destination's received bitmap is the truth."""
        with self.lock:
            self.sent = received.copy()
            self._cursor, self._wrapped, self._jump = 0, False, None

    def unsent(self, page: int, npages: int) -> list[tuple[int, int]]:
        with self.lock:
            return self.sent.runs_within(page, npages, False)

    @property
    def remaining(self) -> int:
        with self.lock:
            return self.total_pages - self.sent.count()


@dataclass
class PushCounters:
    """What a pusher moved (read by the loop for stats and progress)."""

    payload_bytes: int = 0
    normal_pages: int = 0
    zero_pages: int = 0

    def add(self, frame: Pages | ZeroPages) -> int:
        if isinstance(frame, ZeroPages):
            self.zero_pages += frame.npages
            return 0
        self.normal_pages += frame.npages
        nbytes = frame.npages * PAGE_SIZE
        self.payload_bytes += nbytes
        return nbytes


def push_thread(
    worker: Worker,
    bc: BlockingChannel,
    hello: list[bytes | memoryview],
    *,
    ram: GuestRam,
    cursor: PushCursor,
    frame_pages: int,
    bandwidth_bytes_per_s: int,
    counters: PushCounters,
) -> None:
    """Body of the BULK push thread: handshake, then every unsent page, then a clean
    close.  Raises PeerRefused (the destination refused BULK), LinkLost, ProtocolError."""
    bc.write(hello)
    for event in bc.events():
        if isinstance(event, Welcome):
            break
        if isinstance(event, Error):
            raise PeerRefused(
                f"the destination refused the BULK connection: {event.message}", code=event.code
            )
    else:
        raise LinkLost("the destination closed the BULK connection during its handshake")
    pacer = Pacer(bandwidth_bytes_per_s)
    if isinstance(bc.sock, ssl.SSLSocket) or bc.conn.checksum is not None:
        _push_python(worker, bc, ram, cursor, frame_pages, pacer, counters)
        return
    try:
        _push_c(worker, bc, ram, cursor, frame_pages, pacer, counters)
    except OSError as exc:  # the kernel layer's loop raises the socket's own errors
        if not worker.stopping:
            raise map_error(exc, f"the BULK connection to {bc.peer}") from exc


def _push_c(
    worker: Worker,
    bc: BlockingChannel,
    ram: GuestRam,
    cursor: PushCursor,
    frame_pages: int,
    pacer: Pacer,
    counters: PushCounters,
) -> None:
    """The kernel layer's C loop: claim, zero scan, header, sendmsg of guest RAM, with
    no Python per frame.  Byte for byte what the Connection would send."""
    pagemap = PageMap(ram.mapped_regions(), cursor.sent)
    loop = PushLoop(bc.sock.fileno(), pagemap, max_frame_pages=frame_pages)
    cursor.loop = loop
    worker.on_interrupt = loop.interrupt
    try:
        while not worker.stopping:
            event = loop.run(batch_nbytes=_BATCH_NBYTES, timeout_s=_IDLE_S)
            stats = loop.stats
            sent = stats.payload_bytes - counters.payload_bytes
            counters.payload_bytes = stats.payload_bytes
            counters.normal_pages, counters.zero_pages = stats.normal_pages, stats.zero_pages
            bc.session.add_payload_bytes(bc.conn, sent)
            if event is TxEvent.DONE:
                return  # the caller closes the socket: a clean end of BULK (§1)
            delay_s = pacer.delay_s(sent)
            if delay_s and worker.wait_stopping(delay_s):
                return
    finally:
        cursor.loop = None
        worker.on_interrupt = None
        loop.close()


def _push_python(
    worker: Worker,
    bc: BlockingChannel,
    ram: GuestRam,
    cursor: PushCursor,
    frame_pages: int,
    pacer: Pacer,
    counters: PushCounters,
) -> None:
    """Frames through the Connection (TLS, checksums)."""
    scratch = PageBitmap(frame_pages)
    while not worker.stopping:
        run = cursor.claim(frame_pages)
        if run is None:
            return
        sent = 0
        for frame in ram.frames(run[0], run[1], frame_pages, scratch):
            bc.send(frame)
            sent += counters.add(frame)
        delay_s = pacer.delay_s(sent)
        if delay_s and worker.wait_stopping(delay_s):
            return


async def push_on_main(
    link: Link,
    *,
    ram: GuestRam,
    cursor: PushCursor,
    frame_pages: int,
    pacer: Pacer,
    counters: PushCounters,
) -> None:
    """The push on MAIN from the loop (a destination that refused BULK).  Yields to the
    loop after every frame so urgent requests are served in between.  Raises LinkLost."""
    scratch = PageBitmap(frame_pages)
    while True:
        run = cursor.claim(frame_pages)
        if run is None:
            return
        sent = 0
        for frame in ram.frames(run[0], run[1], frame_pages, scratch):
            link.send_main(frame)
            sent += counters.add(frame)
        main = link.main
        if main is None:
            raise LinkLost("MAIN closed during the push")
        delay_s = pacer.delay_s(sent)
        if main.write_blocked:
            await main.drain()
        elif delay_s:
            await asyncio.sleep(delay_s)
        else:
            await asyncio.sleep(0)
