"""The destination's C receive-and-install loop, typed (``csrc/pagestream.c``).

:class:`ReceiveLoop` reads fast-shaped ``Pages`` / ``ZeroPages`` frames from a socket,
checks each range against the page map, installs the pages whose bit is clear and
sets their bits, all in C with the GIL released.  It returns on events only; what it
does not handle it hands back untouched (see :class:`RxEvent`).  Most callers want
:class:`migrated.kernel.pagefeed.AcceleratedReceiver`, which pairs it with the
protocol Connection.

Facts we rely on:

* ``run()`` is called by one thread at a time (the bulk thread).  ``interrupt()``
  may be called from any thread: it stores a flag and writes an eventfd that the loop
  polls together with the socket.
* The socket may be blocking or not: the loop always uses MSG_DONTWAIT and poll().
* The staging buffer, page map, socket and userfaultfd must outlive the loop; the
  owner joins the thread that calls ``run()`` before ``close()``.
"""

from __future__ import annotations

import enum
import mmap
from dataclasses import dataclass
from typing import Any

from ._cloop import CLoop
from ._util import ffi, lib, raise_errno
from .bitmap import PageBitmap
from .pagemap import PageMap, Runs

__all__ = ["ReceiveLoop", "RxEvent", "RxStats"]


class RxEvent(enum.IntEnum):
    """Why :meth:`ReceiveLoop.run` returned."""

    BATCH = lib.MIG_RX_BATCH  # batch_nbytes consumed, or the run list is full
    OTHER = lib.MIG_RX_OTHER  # next frame is not handled: handback() starts it
    EOF = lib.MIG_RX_EOF  # the peer closed the stream between frames
    IDLE = lib.MIG_RX_IDLE  # nothing arrived for timeout_s (call again)
    INTERRUPTED = lib.MIG_RX_INTERRUPTED  # interrupt() was called
    TRUNCATED = lib.MIG_RX_TRUNCATED  # the stream ended inside a Pages payload
    WANTED = lib.MIG_RX_WANTED  # a page set in the watch bitmap was just installed


@dataclass(frozen=True, slots=True)
class RxStats:
    """Cumulative counters of the C loop (frames it handled itself)."""

    bytes: int
    frames: int
    normal_pages: int
    zero_pages: int
    installed_pages: int
    skipped_pages: int
    present_pages: int
    install_s: float
    wait_s: float
    handbacks: int


def staging_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous memory for payloads, backed on first use (no eager zero-fill)."""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class ReceiveLoop(CLoop):
    """The C loop over socket ``fd`` installing into ``pagemap``.

    ``max_frame_nbytes`` must equal the Connection's ``max_frame_payload``: a larger
    Pages frame is handed back so the Connection raises its own error.  With a
    userfaultfd in the page map, payloads land in ``staging`` (allocated here when
    None; at least ``max_frame_nbytes``) and are installed with UFFDIO_COPY; without
    one they are received straight into guest memory.
    """

    def __init__(
        self,
        fd: int,
        pagemap: PageMap,
        *,
        max_frame_nbytes: int,
        staging: Any | None = None,
    ) -> None:
        if max_frame_nbytes <= 0:
            raise ValueError("max_frame_nbytes must be positive")
        self.fd = fd
        self.pagemap = pagemap
        self.max_frame_nbytes = max_frame_nbytes
        self.staging = staging if staging is not None else staging_buffer(max_frame_nbytes)
        self._staging_c = ffi.from_buffer("uint8_t[]", self.staging, require_writable=True)
        if len(self._staging_c) < max_frame_nbytes:
            raise ValueError(f"staging of {len(self._staging_c)} bytes < {max_frame_nbytes}")
        rx = lib.mig_rx_new(pagemap.c, fd, self._staging_c, len(self._staging_c), max_frame_nbytes)
        if rx == ffi.NULL:
            raise_errno(ffi.errno or 12, "allocating the receive loop")
        super().__init__(rx, lib.mig_rx_free, "the receive loop")
        self._wanted: PageBitmap | None = None

    def run(self, *, batch_nbytes: int, timeout_s: float) -> RxEvent:
        """Receive and install until an event.  Raises OSError for a socket or
        userfaultfd failure (the errno of recv/poll/UFFDIO_*), ValueError if closed."""
        rx = self._live()
        with self._busy:
            code = lib.mig_rx_run(rx, batch_nbytes, max(0, int(timeout_s * 1000)))
        if code == lib.MIG_RX_ERROR:
            raise_errno(int(rx.err), "receiving pages")
        return RxEvent(code)

    def runs(self) -> Runs:
        """The ``(first_page, npages)`` runs the last ``run()`` newly installed."""
        rx = self._live()
        n = int(rx.nruns)
        flat = ffi.unpack(rx.runs, 2 * n) if n else []
        return [(int(flat[2 * k]), int(flat[2 * k + 1])) for k in range(n)]

    def handback(self) -> bytes:
        """Bytes of the unhandled frame the last ``run()`` consumed (OTHER,
        TRUNCATED): feed them to the Connection first."""
        rx = self._live()
        return bytes(ffi.buffer(rx.handback, int(rx.handback_len)))

    def handback_payload(self) -> bytes:
        """TRUNCATED only: the payload bytes received before the end of the stream."""
        rx = self._live()
        n = int(rx.handback_payload)
        if not n:
            return b""
        return bytes(ffi.buffer(ffi.cast("char *", rx.handback_payload_addr), n))

    def watch(self, wanted: PageBitmap | None) -> None:
        """Return WANTED as soon as a page whose bit is set in ``wanted`` is installed
        (pages a vCPU waits for), so that its fault is answered at once rather than at
        the end of the batch.  ``wanted`` is shared: any thread may set and clear its
        bits while the loop runs.  Call between runs; None stops watching."""
        rx = self._live()
        if wanted is not None and len(wanted) < self.pagemap.total_pages:
            raise ValueError("the watch bitmap must cover every page")
        self._wanted = wanted
        rx.wanted = ffi.NULL if wanted is None else wanted._c

    def clear_interrupt(self) -> None:
        self._live().interrupt = 0

    @property
    def wake_fd(self) -> int:
        return int(self._live().wake_fd)

    @property
    def stats(self) -> RxStats:
        """Counters so far (after ``close()``: the final ones)."""
        if self._handle is None and self._final is not None:
            return self._final
        s = self._live().stats
        return RxStats(
            int(s.bytes),
            int(s.frames),
            int(s.normal_pages),
            int(s.zero_pages),
            int(s.installed_pages),
            int(s.skipped_pages),
            int(s.present_pages),
            int(s.install_ns) / 1e9,
            int(s.wait_ns) / 1e9,
            int(s.handbacks),
        )

    def _released(self) -> None:
        self._staging_c = None
