"""The source's C push loop, typed (``csrc/pagestream.c``).

:class:`PushLoop` sends every page whose bit in the shared *sent* bitmap is clear:
it claims the next run (atomically, see :meth:`PageBitmap.claim`), splits it into
maximal all-zero and non-zero runs, and writes ``ZeroPages`` headers and ``Pages``
headers with guest RAM itself as payload (``sendmsg``, no copy), byte for byte what
``Connection.send`` produces for those events (request_id 0, no checksum).  It
returns to Python every batch, so the caller can account, pace and stop.

Facts we rely on:

* The source's guest RAM is always present (never registered with userfaultfd), so
  reading it never blocks; the VM is paused in postcopy, so a page read for the zero
  scan is the page that is sent.
* The sent bitmap is shared with the urgent path, which answers page requests on
  another connection and marks what it sent with ``PageBitmap.set``/``claim``: both
  are atomic, so no lock is taken here.  A page claimed by this loop is sent by it
  exactly once; the urgent path may send it too (duplicates are harmless: the
  destination installs only pages whose received bit is clear).
* :meth:`jump` (locality: the page after a fault) may be called from any thread: it
  is one aligned 8-byte store the loop reads atomically at its next claim.
* After IDLE or INTERRUPTED a frame may be half written (:attr:`pending`): write
  nothing else on the socket until ``run()`` returned BATCH or DONE.
* The memory, bitmap and socket must outlive the loop; the owner joins the thread
  that calls ``run()`` before ``close()``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._cloop import CLoop
from ._util import ffi, lib, raise_errno
from .pagemap import PageMap

__all__ = ["PushLoop", "TxEvent", "TxStats"]


class TxEvent(enum.IntEnum):
    """Why :meth:`PushLoop.run` returned."""

    BATCH = lib.MIG_TX_BATCH  # batch_nbytes written, every frame complete
    DONE = lib.MIG_TX_DONE  # no unsent page is left, everything written
    IDLE = lib.MIG_TX_IDLE  # the socket had no room for timeout_s (call again)
    INTERRUPTED = lib.MIG_TX_INTERRUPTED  # interrupt() was called


@dataclass(frozen=True, slots=True)
class TxStats:
    """Cumulative counters of the loop."""

    wire_bytes: int
    payload_bytes: int
    frames: int
    normal_pages: int
    zero_pages: int
    claimed_pages: int
    scan_s: float
    send_s: float
    wait_s: float


class PushLoop(CLoop):
    """The C push loop writing to socket ``fd`` the unsent pages of ``pagemap`` (whose
    bitmap is the sent bitmap), in frames of at most ``max_frame_pages`` pages."""

    def __init__(self, fd: int, pagemap: PageMap, *, max_frame_pages: int) -> None:
        if pagemap.uffd is not None:
            raise ValueError("the push loop reads guest RAM: a source page map has no uffd")
        if not 0 < max_frame_pages < 1 << 24:
            raise ValueError(f"max_frame_pages {max_frame_pages} out of range")
        self.fd = fd
        self.pagemap = pagemap
        self.max_frame_pages = max_frame_pages
        tx = lib.mig_tx_new(pagemap.c, fd, max_frame_pages)
        if tx == ffi.NULL:
            raise_errno(ffi.errno or 12, "allocating the push loop")
        super().__init__(tx, lib.mig_tx_free, "the push loop")

    def run(self, *, batch_nbytes: int, timeout_s: float) -> TxEvent:
        """Push until an event.  Raises OSError with the errno of sendmsg/poll (EPIPE,
        ECONNRESET, ...), ValueError if closed."""
        tx = self._live()
        with self._busy:
            code = lib.mig_tx_run(tx, batch_nbytes, max(0, int(timeout_s * 1000)))
        if code == lib.MIG_TX_ERROR:
            raise_errno(int(tx.err), "pushing pages")
        return TxEvent(code)

    def jump(self, page: int) -> None:
        """Start the next claim at ``page`` (locality after a fault).  Any thread."""
        if 0 <= page < self.pagemap.total_pages:
            with self._guard:
                if self._handle is not None:
                    self._handle.jump = page

    @property
    def cursor(self) -> int:
        """Where the next claim starts (absent a jump)."""
        return int(self._live().cursor)

    @property
    def pending(self) -> bool:
        """True while a frame is built but not completely written."""
        return bool(self._live().niov)

    @property
    def stats(self) -> TxStats:
        """Counters so far (after ``close()``: the final ones)."""
        if self._handle is None and self._final is not None:
            return self._final
        s = self._live().stats
        return TxStats(
            int(s.wire_bytes),
            int(s.payload_bytes),
            int(s.frames),
            int(s.normal_pages),
            int(s.zero_pages),
            int(s.claimed_pages),
            int(s.scan_ns) / 1e9,
            int(s.send_ns) / 1e9,
            int(s.wait_ns) / 1e9,
        )
