"""The C receive loop as an accelerator of the sans-IO protocol Connection.

:class:`AcceleratedReceiver` reads one connection of a destination (BULK, or any
connection that carries pages from the source) from a thread.  Fast-shaped
``Pages`` / ``ZeroPages`` frames never reach Python: the C loop
(:class:`~migrated.kernel.recvloop.ReceiveLoop`) receives, checks and installs them.
Every other byte goes to the Connection, in order and untouched, so every limit and
every error is the Connection's own.

Facts we rely on:

* The Connection keeps no state for Pages and ZeroPages frames (their receipt changes
  neither its phase nor its rules), so frames it never sees leave it as it would be
  after seeing them.  If a later protocol version changes that, the C loop must not
  be used for it.
* To hand the stream back and forth without a byte being read twice or lost, Python
  never reads past the end of the frame it is decoding: it peeks (MSG_PEEK), finds
  the end of the msgpack header (``mig_msgpack_extent``), consumes exactly that, then
  reads the payload exactly through ``payload_target()``.  At the frame's end the
  Connection holds no buffered byte, and the C loop takes over again.
* Where that is impossible, the rest of the connection is decoded in Python only
  ("sticky" mode; correct, just slower): when a checksum was negotiated, after the
  peer sent Error (the Connection refuses every later frame), for a
  payload that is not Pages (no sink buffer), or for a header that is not valid
  msgpack or longer than the header limit (the Connection then raises).
* The driver owns the Connection's payload sink: Pages payloads go to the staging
  buffer (destination with userfaultfd) or straight into guest memory (direct mode).
* One thread calls :meth:`receive`; :meth:`interrupt` may be called from any thread.
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ._util import ffi, lib
from .pagemap import PageMap, Runs
from .recvloop import ReceiveLoop, RxEvent

__all__ = [
    "AcceleratedReceiver",
    "ConnectionLike",
    "ProtocolHooks",
    "Reason",
    "Received",
    "msgpack_extent",
]

_STICKY_RECV_NBYTES = 1 << 20
_PEEK_NBYTES = 512  # a longer header is consumed in pieces of this size
_MAX_PENDING_OBJECTS = 1 << 20


def msgpack_extent(data: bytes) -> int:
    """Length of the first complete msgpack object in ``data``; 0 if ``data`` is a
    proper prefix of one; -1 if it cannot start a valid object."""
    return int(
        lib.mig_msgpack_extent(ffi.from_buffer("uint8_t[]", data), len(data), _MAX_PENDING_OBJECTS)
    )


class ConnectionLike(Protocol):
    """The parts of ``migrated.protocol.Connection`` the driver uses."""

    checksum: str | None
    max_frame_payload: int
    error_received: bool

    @property
    def in_payload(self) -> bool: ...
    def receive_data(self, data: bytes | bytearray | memoryview) -> None: ...
    def next_event(self) -> Any: ...
    def payload_target(self) -> memoryview | None: ...
    def payload_written(self, nbytes: int) -> None: ...
    def set_payload_sink(self, sink: Callable[[Any], memoryview | None] | None) -> None: ...


@dataclass(frozen=True, slots=True)
class ProtocolHooks:
    """What the kernel layer must know of the protocol, handed in by the caller (the
    kernel does not import ``migrated.protocol``): the two page event classes, the
    NEED_DATA sentinel, the ConnectionClosed class and the header size limit."""

    pages: type
    zero_pages: type
    need_data: object
    connection_closed: type
    max_header_nbytes: int


class Reason(enum.Enum):
    """Why :meth:`AcceleratedReceiver.receive` returned."""

    BATCH = "batch"  # batch_nbytes received
    EVENTS = "events"  # the Connection produced events (Progress, Error, ...)
    EOF = "eof"  # the stream ended; events ends with ConnectionClosed
    IDLE = "idle"  # nothing arrived for timeout_s
    INTERRUPTED = "interrupted"  # interrupt() was called
    WANTED = "wanted"  # a watched page was installed (see ReceiveLoop.watch)


@dataclass(frozen=True, slots=True)
class Received:
    """``runs``: pages newly installed since the previous call, ``(first, npages)``;
    ``events``: what the Connection produced, in order (never Pages or ZeroPages:
    those were installed and are in ``runs``)."""

    reason: Reason
    runs: Runs
    events: list[Any]


class _Mode(enum.Enum):
    C = "c"  # the C loop reads
    HEADER = "header"  # Python reads one frame's header exactly
    PAYLOAD = "payload"  # ... then its payload exactly
    STICKY = "sticky"  # Python reads everything from here on
    EOF = "eof"


class AcceleratedReceiver:
    """Reads ``sock`` for ``conn`` (open, layout known), installing into ``pagemap``.

    ``conn.max_frame_payload`` bounds Pages payloads for both paths.  The receiver
    reads a private dup of ``sock`` (blocking or not, with or without a timeout: it
    never waits inside recv).  The connection and page map must outlive the
    receiver; :meth:`close` (after the receiving thread was joined) frees the C loop.
    """

    def __init__(
        self,
        sock: socket.socket,
        conn: ConnectionLike,
        pagemap: PageMap,
        hooks: ProtocolHooks,
        *,
        staging: Any | None = None,
    ) -> None:
        # A private dup without timeout: Python's timeout mode would poll before every
        # recv (and raise TimeoutError); flags of the shared description stay as they are.
        self.sock = socket.socket(fileno=os.dup(sock.fileno()))
        self.conn, self.pagemap, self.hooks = conn, pagemap, hooks
        self.loop = ReceiveLoop(
            self.sock.fileno(), pagemap, max_frame_nbytes=conn.max_frame_payload, staging=staging
        )
        self._staging = memoryview(self.loop.staging).cast("B")
        self._mode = _Mode.C
        self._hdr = bytearray()  # header bytes of the current Python frame, consumed
        self._interrupted = False
        self._eof_fed = False
        self._failure: Exception | None = None  # raised by the next receive()
        self._dead: Exception | None = None  # raised by every later receive()
        self._runs: Runs = []
        self._events: list[Any] = []
        self._poll = select.poll()
        self._poll.register(self.sock.fileno(), select.POLLIN)
        self._poll.register(self.loop.wake_fd, select.POLLIN)
        self._scratch = memoryview(bytearray(_STICKY_RECV_NBYTES))
        #: frames decoded by the Connection (not by C) and their installed pages
        self.python_frames = 0
        self.python_pages = 0
        conn.set_payload_sink(self._sink)

    @property
    def mode(self) -> str:
        """Who reads now: "c", "header", "payload", "sticky" or "eof"."""
        return self._mode.value

    def interrupt(self) -> None:
        """Make a running (or the next) :meth:`receive` return INTERRUPTED.  Any thread."""
        self._interrupted = True
        self.loop.interrupt()

    def receive(self, *, batch_nbytes: int, timeout_s: float) -> Received:
        """Receive and install until an event (see :class:`Reason`).

        Raises what the Connection raises (``RemoteProtocolError`` for a bad stream:
        the receiver is then dead), OSError for a socket or userfaultfd failure.
        Pages installed and events decoded before a failure are returned first: the
        failure is then raised by the next call (and by every call after it).
        """
        if self._failure is not None:
            failure, self._failure = self._failure, None
            self._dead = failure
            raise failure
        if self._dead is not None:
            raise self._dead
        self._runs, self._events = [], []
        try:
            reason = self._receive(batch_nbytes, timeout_s)
        except Exception as exc:
            if not (self._runs or self._events):
                self._dead = exc
                raise
            # Report what was installed and decoded before the failure first.
            self._failure = exc
            reason = Reason.EVENTS
        return Received(reason, self._runs, self._events)

    def _receive(self, batch_nbytes: int, timeout_s: float) -> Reason:
        while True:
            mode = self._mode
            if mode is _Mode.C:
                if self.conn.checksum is not None or self.conn.error_received:
                    # Checksummed Pages are not fast; after an Error the Connection
                    # refuses every frame, which only it may say.
                    self._mode = _Mode.STICKY
                    continue
                reason = self._run_c(batch_nbytes, timeout_s)
                if reason is not None:
                    return reason
            elif mode is _Mode.HEADER:
                reason = self._read_header(timeout_s)
                if reason is not None:
                    return reason
            elif mode is _Mode.PAYLOAD:
                reason = self._read_payload(timeout_s)
                if reason is not None:
                    return reason
            elif mode is _Mode.STICKY:
                return self._read_sticky(batch_nbytes, timeout_s)
            else:
                return Reason.EOF
            if self._events and self._mode is _Mode.C:
                return Reason.EVENTS

    # -- the C loop ---------------------------------------------------------------------

    def _run_c(self, batch_nbytes: int, timeout_s: float) -> Reason | None:
        loop = self.loop
        try:
            ev = loop.run(batch_nbytes=batch_nbytes, timeout_s=timeout_s)
        finally:
            # Also when run() failed: the pages it installed before the error are in
            # place and their bits set, so they must be reported (then the error).
            self._runs.extend(loop.runs())
        if ev is RxEvent.BATCH:
            return Reason.BATCH
        if ev is RxEvent.WANTED:
            return Reason.WANTED
        if ev is RxEvent.IDLE:
            return Reason.IDLE
        if ev is RxEvent.INTERRUPTED:
            self._interrupted = False
            return Reason.INTERRUPTED
        if ev is RxEvent.EOF:
            self._feed_eof()
            return Reason.EOF
        handback = loop.handback()
        if ev is RxEvent.TRUNCATED:
            self._feed(handback + loop.handback_payload())
            self._feed_eof()  # the Connection raises "the stream ended inside a payload"
            return Reason.EOF
        # OTHER: this frame is the Connection's; it starts with the handed-back bytes.
        self._mode = _Mode.HEADER
        self._hdr = bytearray(handback)
        if handback:
            self._feed(handback)
        return None

    # -- one frame, read exactly ----------------------------------------------------------

    def _read_header(self, timeout_s: float) -> Reason | None:
        sock, limit = self.sock, self.hooks.max_header_nbytes
        while True:
            want = min(limit + 1 - len(self._hdr), _PEEK_NBYTES)
            try:
                peek = sock.recv(want, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                reason = self._wait(timeout_s)
                if reason is not None:
                    return reason
                continue
            if not peek:
                self._feed_eof()  # the Connection raises "ended inside a frame header"
                return Reason.EOF
            buf = bytes(self._hdr) + peek
            ext = msgpack_extent(buf)
            if ext > 0:
                data = self._recv_queued(ext - len(self._hdr))
                self._hdr = bytearray()
                self._feed(data)
                self._mode = _Mode.PAYLOAD if self.conn.in_payload else _Mode.C
                if self._mode is _Mode.C:
                    self.python_frames += 1
                return None
            data = self._recv_queued(len(peek))
            if ext < 0 or len(buf) > limit:
                self._mode = _Mode.STICKY  # not msgpack, or too long: the Connection decides
                self._feed(data)
                return None
            self._hdr += data  # all of it is header: the object is not complete yet
            self._feed(data)

    def _read_payload(self, timeout_s: float) -> Reason | None:
        conn, sock = self.conn, self.sock
        while conn.in_payload:
            target = conn.payload_target()
            if target is None:
                if conn.in_payload:  # a payload with no sink buffer: length unknown here
                    self._mode = _Mode.STICKY
                    return None
                break
            try:
                n = sock.recv_into(target, len(target), socket.MSG_DONTWAIT)
            except BlockingIOError:
                reason = self._wait(timeout_s)
                if reason is not None:
                    return reason
                continue
            if n == 0:
                self._feed_eof()
                return Reason.EOF
            conn.payload_written(n)
            self._drain()
        self.python_frames += 1
        self._mode = _Mode.C
        return None

    def _recv_queued(self, n: int) -> bytes:
        """Consume ``n`` bytes that a peek showed are queued."""
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out), socket.MSG_DONTWAIT)
            if not chunk:
                raise ConnectionError("peeked bytes vanished from the socket")
            out += chunk
        return bytes(out)

    # -- everything in Python ----------------------------------------------------------

    def _read_sticky(self, batch_nbytes: int, timeout_s: float) -> Reason:
        conn, sock = self.conn, self.sock
        got = 0
        while True:
            if self._events:
                return Reason.EVENTS
            if batch_nbytes and got >= batch_nbytes:
                return Reason.BATCH
            target = conn.payload_target()
            try:
                if target is not None:
                    n = sock.recv_into(
                        target, min(len(target), _STICKY_RECV_NBYTES), socket.MSG_DONTWAIT
                    )
                    if n:
                        conn.payload_written(n)
                else:
                    n = sock.recv_into(self._scratch, len(self._scratch), socket.MSG_DONTWAIT)
                    if n:
                        conn.receive_data(self._scratch[:n])
            except BlockingIOError:
                reason = self._wait(timeout_s)
                if reason is not None:
                    return reason
                continue
            if n == 0:
                self._feed_eof()
                return Reason.EOF
            got += n
            self._drain()

    # -- feeding the Connection ----------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._drain()

    def _feed_eof(self) -> None:
        self._mode = _Mode.EOF
        if not self._eof_fed:
            self._eof_fed = True
            self.conn.receive_data(b"")
            self._drain()

    def _drain(self) -> None:
        conn, hooks = self.conn, self.hooks
        while True:
            ev: Any = conn.next_event()
            if ev is hooks.need_data:
                return
            t = type(ev)
            if t is hooks.pages or t is hooks.zero_pages:
                self._install(ev, t is hooks.pages)
                continue
            self._events.append(ev)
            if t is hooks.connection_closed:
                return

    def _install(self, ev: Any, has_data: bool) -> None:
        pm = self.pagemap
        res = pm.install(pm.page_of_gpa(ev.gpa), ev.npages, ev.data if has_data else None)
        self._runs.extend(res.runs)
        self.python_pages += ev.npages
        if self._mode is _Mode.STICKY:
            self.python_frames += 1

    def _sink(self, event: object) -> memoryview | None:
        if type(event) is not self.hooks.pages:
            return None
        header: Any = event
        pm = self.pagemap
        page = pm.page_of_gpa(header.gpa)
        if pm.uffd is None:
            return pm.host_view(page, header.npages)  # direct mode: in place, as C does
        return self._staging[: header.npages * pm.page_size_of_gpa(header.gpa)]

    def _wait(self, timeout_s: float) -> Reason | None:
        if self._interrupted:
            self._interrupted = False
            self.loop.clear_interrupt()
            return Reason.INTERRUPTED
        ready = self._poll.poll(max(0, int(timeout_s * 1000)))
        if not ready:
            return Reason.IDLE
        if any(fd == self.loop.wake_fd for fd, _ in ready):
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.loop.wake_fd)
        if self._interrupted:
            self._interrupted = False
            self.loop.clear_interrupt()
            return Reason.INTERRUPTED
        return None

    def close(self) -> None:
        """Free the C loop and the private socket dup (idempotent; after the receiving
        thread was joined).  The caller's socket stays open."""
        self.conn.set_payload_sink(None)
        self.loop.close()
        self.sock.close()
