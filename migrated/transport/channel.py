"""asyncio glue: one TCP (or TLS) connection driven by a sans-IO :class:`Connection`.

A :class:`Channel` is an ``asyncio.BufferedProtocol`` that only moves bytes: the event
loop receives straight into the buffer the connection wants (the payload sink's
buffer while a page payload is in flight, a scratch buffer otherwise), and every
complete event is handed, synchronously and in order, to ``on_event``.  A payload
buffer is therefore free again when the callback returns.  Once the channel belongs to
a :class:`~migrated.protocol.session.Session` (``attach``), every event goes through
the session, which feeds its state table; before that (a destination reading the
Hello of a fresh connection) the bare connection decodes.

Failure is never only logged: a protocol error, an exception raised by ``on_event``,
the transport closing or a refused TLS peer resolves :attr:`Channel.closed` with an
error of our tree (mapped by :func:`~migrated.transport.net.map_error`); the owner
awaits it or has a done-callback on it.  A protocol violation by the peer is named to
it in an ``Error`` frame before the connection closes.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

from migrated.errors import (
    LinkLost,
    MigratedError,
    ProtocolError,
    TransportError,
)
from migrated.protocol import NEED_DATA, ConnectionClosed, Error
from migrated.protocol.connection import Connection
from migrated.protocol.session import Session

from .faults import FaultPlan
from .net import map_error, tune_socket
from .security import Security

__all__ = ["Channel", "OnEvent", "send_queue_empty"]

log = logging.getLogger(__name__)

#: Until the handshake is done a connection gets a small buffer: an idle or hostile
#: connection must not cost a receiver much memory (docs/protocol.md §9).
_HANDSHAKE_SCRATCH_NBYTES = 4096
_SCRATCH_NBYTES = 256 * 1024
_MAX_READ_NBYTES = 1024 * 1024
_WRITE_HIGH_WATER = 8 * 1024 * 1024
_WRITE_LOW_WATER = 2 * 1024 * 1024

OnEvent = Callable[["Channel", Any], None]


def send_queue_empty(sock: Any) -> bool:
    """True when the kernel holds no unsent or unacknowledged bytes of ``sock``
    (SIOCOUTQ): what we wrote has reached the peer's kernel."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except OSError:
        return True  # not a TCP socket (tests): nothing to wait for
    return struct.unpack("i", raw)[0] == 0


class Channel(asyncio.BufferedProtocol):
    """One connection.  ``on_event(channel, event)`` receives its events."""

    def __init__(
        self,
        conn: Connection,
        *,
        name: str,
        on_event: OnEvent,
        security: Security,
        bulk: bool = False,
        bounded_reads: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn = conn
        self.name = name
        self.on_event = on_event
        self.security = security
        self.bulk = bulk
        #: libuv reads a ready stream up to 32 times per loop iteration.  On a channel
        #: carrying bulk pages that is megabytes of work before the loop looks at the
        #: userfaultfd or the urgent channel again: a fault's latency.  With this set,
        #: reading pauses after each (bounded) read and resumes next iteration.
        self.bounded_reads = bounded_reads
        self.session: Session | None = None
        self.fault: FaultPlan | None = None
        self.on_fault: Callable[[], None] | None = None
        self.transport: asyncio.Transport | None = None
        self.bytes_received = 0
        self.peer = ""
        self._clock = clock
        self._holds: set[str] = set()
        self._detached = False
        self._scratch = memoryview(bytearray(_HANDSHAKE_SCRATCH_NBYTES))
        self._into_target = False
        self._writable = asyncio.Event()
        self._writable.set()
        loop = asyncio.get_running_loop()
        self._loop = loop
        #: Resolves when the connection is over: None when we closed it on purpose,
        #: else the error (LinkLost, ProtocolError, AuthorizationError...).
        self.closed: asyncio.Future[None] = loop.create_future()
        self.closed.add_done_callback(_consume)

    # -- ownership ---------------------------------------------------------------------

    def attach(self, session: Session, name: str) -> None:
        """From now on every event goes through ``session`` (which feeds its table)."""
        self.session = session
        self.name = name
        if self._scratch.nbytes < _SCRATCH_NBYTES:
            self._scratch = memoryview(bytearray(_SCRATCH_NBYTES))

    @property
    def is_open(self) -> bool:
        return not self.closed.done() and not self._detached

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = tr
        peername = tr.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        tune_socket(tr.get_extra_info("socket"), bulk=self.bulk)
        # A TLS peer was authorized before this protocol saw the connection
        # (transport.tls_check): nothing unauthorized is ever read here.
        tr.set_write_buffer_limits(high=_WRITE_HIGH_WATER, low=_WRITE_LOW_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self.conn.payload_target()
        if target is None and self.conn.in_payload:
            # Buffered bytes may have just completed a sinked payload: hand its event out
            # (which may start the next payload) and ask again, once.  A payload with no
            # sink (VmState, bitmaps) is assembled from the scratch buffer.
            self._drain()
            target = self.conn.payload_target()
        if target is not None:
            self._into_target = True
            return target[:_MAX_READ_NBYTES] if self.bounded_reads else target
        self._into_target = False
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._detached:
            return  # cannot happen after pause_reading + close; never feed a lent conn
        self.bytes_received += nbytes
        if self.session is not None:
            self.session.data_received(self.conn, self._clock())
        if self.bounded_reads and "yield" not in self._holds:
            self.hold_reading("yield")
            self._loop.call_soon(self.release_reading, "yield")
        try:
            if self._into_target:
                self.conn.payload_written(nbytes)
            else:
                self.conn.receive_data(self._scratch[:nbytes])
        except ProtocolError as exc:
            self._fail(exc)
            return
        self._drain()

    def eof_received(self) -> bool:
        try:
            self.conn.receive_data(b"")
        except ProtocolError as exc:
            self._fail(exc)
            return False
        self._drain()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        if exc is None:
            self._finish(LinkLost(f"the {self.name} connection to {self.peer} was closed"))
        else:
            self._finish(map_error(exc, f"the {self.name} connection to {self.peer}"))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def hold_reading(self, reason: str) -> None:
        """Stop reading until every reason given here was released."""
        if not self._holds and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._holds.add(reason)

    def release_reading(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if not self._holds and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- events ----------------------------------------------------------------------

    def _drain(self) -> None:
        """Hand out every complete event (stops when the channel failed or was lent)."""
        while self.is_open:
            try:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    return
                if type(event) is ConnectionClosed:
                    self._finish(
                        LinkLost(f"the peer closed the {self.name} connection ({self.peer})")
                    )
                    return
                fault = self.fault
                if fault is not None and fault.due(event, sent=False, before=True):
                    self._cut()  # dropped before anything, the session's table too, saw it
                    return
                if self.session is not None:
                    self.session.receive(self.conn, event)
                self.on_event(self, event)
                if fault is not None and fault.due(event, sent=False, before=False):
                    self._cut()
                    return
            except Exception as exc:  # the owner's callback too: its failure ends the channel
                self._fail(exc)
                return

    def _finish(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            if exc is None:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        """Close on a failure.  A protocol violation (or our own bug) is named to the
        peer first, in an Error frame flushed by close(), so both logs say the same."""
        if isinstance(exc, OSError):
            exc = map_error(exc, f"the {self.name} connection to {self.peer}")
        elif not isinstance(exc, MigratedError):
            log.error("bug while handling the %s connection", self.name, exc_info=exc)
        code = exc.code if isinstance(exc, ProtocolError) else "internal"
        if (
            not isinstance(exc, TransportError)
            and self.transport
            and not self.transport.is_closing()
        ):
            try:
                self._write(Error(code, f"{exc}"[:4000] or type(exc).__name__))
            except MigratedError as err:  # e.g. the table refuses even Error: say so
                log.warning("could not name the failure to the peer: %s", err)
        self._finish(exc)

    def _cut(self) -> None:
        if self.on_fault is not None:
            self.on_fault()
        else:
            self.abort()

    # -- sending ---------------------------------------------------------------------

    def send(self, event: Any) -> None:
        """Encode (through the session, once attached) and write ``event`` now.
        Raises LinkLost when the connection is gone, LocalProtocolError when the
        protocol forbids the event (nothing is written)."""
        fault = self.fault
        if fault is not None and fault.due(event, sent=True, before=True):
            self._cut()
            raise LinkLost(f"fault injected before sending {type(event).__name__}")
        self._write(event)
        if fault is not None and fault.due(event, sent=True, before=False):
            self._loop.create_task(self._cut_when_delivered())

    def _write(self, event: Any) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._detached:
            raise LinkLost(f"the {self.name} connection to {self.peer} is closed")
        session = self.session
        transport.writelines(session.send(self.conn, event) if session else self.conn.send(event))

    def write_raw(self, data: list[bytes | memoryview]) -> None:
        """Write already-encoded buffers (the Hello a Session built)."""
        if self.transport is None or self.transport.is_closing():
            raise LinkLost(f"the {self.name} connection to {self.peer} is closed")
        self.transport.writelines(data)

    async def _cut_when_delivered(self, timeout_s: float = 2.0) -> None:
        deadline = self._loop.time() + timeout_s
        sock = self.transport.get_extra_info("socket") if self.transport else None
        while self._loop.time() < deadline and self.transport is not None:
            if self.transport.get_write_buffer_size() == 0 and send_queue_empty(sock):
                break
            await asyncio.sleep(0.001)
        self._cut()

    @property
    def write_blocked(self) -> bool:
        return not self._writable.is_set()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark.
        Raises the channel's failure if it closed meanwhile."""
        if not self._writable.is_set():
            await self._writable.wait()
        if self.closed.done():
            exc = self.closed.exception()
            raise exc if exc is not None else LinkLost(f"the {self.name} connection is closed")

    # -- handing over and closing ------------------------------------------------------

    def detach(self) -> int:
        """Give the connection to another owner (a thread): returns a dup of the
        socket's fd.  From here on this channel never touches ``conn`` again; it stops
        reading and closes its transport (the dup keeps TCP up).  Not possible over TLS
        (the TLS state lives in this transport).

        Called from ``on_event``, the drain loop that called it stops before asking
        ``conn`` for another event: two owners decoding one stream would hand a frame
        to the wrong one (seen: a page installed from a staging buffer the new owner was
        already refilling)."""
        assert self.transport is not None
        if self.transport.get_extra_info("ssl_object") is not None:
            raise RuntimeError("a TLS connection cannot be handed to another owner")
        self._detached = True
        fd = os.dup(self.transport.get_extra_info("socket").fileno())
        self.hold_reading("detached")
        self.transport.close()
        if not self.closed.done():
            self.closed.set_result(None)
        return fd

    def close(self) -> None:
        """Close on purpose (queued data is flushed first)."""
        self._finish(None)

    def abort(self) -> None:
        """Drop the connection at once (RST)."""
        if self.transport is not None:
            self.transport.abort()
        self._finish(None)


def _consume(fut: asyncio.Future[None]) -> None:
    # The owner learns of failures through its own callbacks; never let asyncio log an
    # unretrieved exception as if nobody looked.
    if not fut.cancelled():
        fut.exception()
