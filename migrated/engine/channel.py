"""asyncio glue: one TCP connection driven by a sans-IO :class:`Connection`.

This layer only moves bytes.  A :class:`Channel` is an ``asyncio.BufferedProtocol``:
the event loop receives straight into the buffer the connection wants (the payload
sink's buffer while a page payload is in flight, a scratch buffer otherwise) and every
complete event is handed, synchronously and in order, to the owner's ``on_event``
callback.  A payload buffer is therefore free again when the callback returns.

Failure is never only logged: a protocol error, an exception raised by ``on_event``,
or the transport closing resolves :attr:`Channel.closed`, which the owning task
awaits (with the exception, if any).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from migrated.errors import ProtocolError
from migrated.protocol import NEED_DATA, ConnectionClosed, Error
from migrated.protocol.connection import Connection

__all__ = ["Channel", "ChannelClosedError", "connect", "tune_socket"]

_SCRATCH_NBYTES = 256 * 1024
_MAX_READ_NBYTES = 1024 * 1024
_SOCKET_BUFFER_NBYTES = 8 * 1024 * 1024
_WRITE_HIGH_WATER = 8 * 1024 * 1024
_WRITE_LOW_WATER = 2 * 1024 * 1024

OnEvent = Callable[["Channel", Any], None]


class ChannelClosedError(ConnectionError):
    """The peer closed or reset the connection."""


def tune_socket(sock: socket.socket | None, *, bulk: bool) -> None:
    """TCP_NODELAY everywhere (a page request must not wait for Nagle); large socket
    buffers on bulk channels so the pipe stays full."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if bulk:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_NBYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_NBYTES)


class Channel(asyncio.BufferedProtocol):
    """One connection.  Until ``on_event`` is set, events queue for :meth:`next_event`."""

    def __init__(
        self,
        conn: Connection,
        *,
        name: str = "",
        bulk: bool = False,
        one_read_per_iteration: bool = False,
    ) -> None:
        self.conn = conn
        self.name = name
        self.bulk = bulk
        #: libuv reads a ready stream up to 32 times per loop iteration.  On the
        #: destination's bulk channel that is megabytes of installs before the loop
        #: looks at the userfaultfd or the urgent channel again: a fault's latency.
        #: With this set, reading pauses after each read and resumes next iteration.
        self.one_read_per_iteration = one_read_per_iteration
        self._holds: set[str] = set()
        self._detached = False
        self.on_event: OnEvent | None = None
        self.transport: asyncio.Transport | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.last_rx = time.monotonic()
        self._scratch = memoryview(bytearray(_SCRATCH_NBYTES))
        self._into_target = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._writable = asyncio.Event()
        self._writable.set()
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.connected: asyncio.Future[None] = loop.create_future()

    # -- asyncio.BufferedProtocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = tr
        tune_socket(tr.get_extra_info("socket"), bulk=self.bulk)
        tr.set_write_buffer_limits(high=_WRITE_HIGH_WATER, low=_WRITE_LOW_WATER)
        if not self.connected.done():
            self.connected.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        target = self.conn.payload_target()
        if target is None and self.conn.in_payload:
            # Buffered bytes may have just completed a sinked payload: hand its event out
            # (which may start the next payload) and ask again, once.  A payload with no
            # sink (VmState, bitmaps) is still in flight afterwards: it is assembled from
            # the scratch buffer, so looping until it completes would never end.
            self._drain()
            target = self.conn.payload_target()
        if target is not None:
            self._into_target = True
            # A bounded read keeps each loop iteration short: faults wait less.
            return target[:_MAX_READ_NBYTES] if self.one_read_per_iteration else target
        self._into_target = False
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._detached:
            return  # cannot happen after pause_reading + close; never feed a lent conn
        self.bytes_received += nbytes
        self.last_rx = time.monotonic()
        if self.one_read_per_iteration and "yield" not in self._holds:
            self.hold_reading("yield")
            asyncio.get_running_loop().call_soon(self.release_reading, "yield")
        try:
            if self._into_target:
                self.conn.payload_written(nbytes)
            else:
                self.conn.receive_data(self._scratch[:nbytes])
        except Exception as exc:
            self._fail(exc)
            return
        self._drain()

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

    def eof_received(self) -> bool:
        try:
            self.conn.receive_data(b"")
        except Exception as exc:
            self._fail(exc)
            return False
        self._drain()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        if not self.connected.done():
            self.connected.set_exception(exc or ChannelClosedError(f"{self.name}: closed"))
        if not self.closed.done():
            if exc is None:
                exc = ChannelClosedError(f"{self.name} channel closed by the peer")
            self.closed.set_exception(exc)
        self._queue.put_nowait(exc)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- events ----------------------------------------------------------------------

    def _drain(self) -> bool:
        """Hand out every complete event.  Returns False once the channel failed or
        was detached."""
        while not self.closed.done() and not self._detached:
            try:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    return True
                if isinstance(event, ConnectionClosed):
                    self._finish(ChannelClosedError(f"{self.name} channel closed by the peer"))
                    return False
                if self.on_event is not None:
                    self.on_event(self, event)
                else:
                    self._queue.put_nowait(event)
            except Exception as exc:
                self._fail(exc)
                return False
        return False

    def _finish(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            if exc is None:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(exc)
        self._queue.put_nowait(exc)
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        """Close on a failure; a protocol violation is named to the peer first (an
        Error frame, flushed by close()) so both logs say the same thing."""
        if (
            isinstance(exc, ProtocolError)
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            with contextlib.suppress(Exception):
                self.transport.writelines(self.conn.send(Error(exc.code, str(exc)[:4000])))
        self._finish(exc)

    async def next_event(self, timeout_s: float | None = None) -> Any:
        """The next queued event (only while ``on_event`` is None).  Raises the
        channel's failure, or TimeoutError."""
        async with asyncio.timeout(timeout_s):
            item = await self._queue.get()
        if isinstance(item, BaseException) or item is None:
            if self.closed.done() and self.closed.exception() is not None:
                raise self.closed.exception()  # type: ignore[misc]
            raise ChannelClosedError(f"{self.name} channel closed")
        return item

    def deliver_to(self, on_event: OnEvent) -> None:
        """Switch from queued delivery to the callback; events already queued go to it
        first, in order."""
        self.on_event = on_event
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not isinstance(item, BaseException) and item is not None:
                on_event(self, item)

    # -- sending ---------------------------------------------------------------------

    def send(self, event: Any) -> None:
        """Encode and write ``event`` now (buffers are written or queued by asyncio).
        Raises ChannelClosedError when the transport is gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ChannelClosedError(f"{self.name} channel is closed")
        bufs = self.conn.send(event)
        for b in bufs:
            self.bytes_sent += len(b)
        transport.writelines(bufs)

    def silent_for(self, now: float) -> float:
        """Seconds since the last byte arrived (both sides send heartbeats)."""
        return now - self.last_rx

    @property
    def write_blocked(self) -> bool:
        return not self._writable.is_set()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if not self._writable.is_set():
            await self._writable.wait()
        if self.closed.done():
            exc = self.closed.exception()
            raise exc if exc is not None else ChannelClosedError(f"{self.name} channel closed")

    def detach(self) -> int:
        """Give the connection to another owner (a thread): returns a dup of the
        socket's fd.  From here on this channel never touches ``conn`` again; it stops
        reading and closes its transport (the dup keeps TCP up).

        Called from an ``on_event`` callback, the drain loop that called it stops
        before asking ``conn`` for another event: two owners decoding one stream
        would hand a frame to the wrong one (seen: a page installed from a staging
        buffer the new owner was already refilling)."""
        assert self.transport is not None
        self._detached = True
        self.on_event = None
        fd = os.dup(self.transport.get_extra_info("socket").fileno())
        self.hold_reading("detached")
        self.transport.close()
        return fd

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        """Drop the connection at once (tests and cancellation)."""
        if self.transport is not None:
            self.transport.abort()


async def connect(
    host: str,
    port: int,
    conn: Connection,
    *,
    name: str,
    bulk: bool = False,
    timeout_s: float = 10.0,
) -> Channel:
    """Open a TCP connection driven by ``conn``.  Raises OSError/TimeoutError with the
    address in the message."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            _, proto = await loop.create_connection(
                lambda: Channel(conn, name=name, bulk=bulk), host, port
            )
    except TimeoutError as exc:
        raise TimeoutError(f"connecting to {host}:{port} timed out after {timeout_s} s") from exc
    except OSError as exc:
        raise OSError(exc.errno, f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    return proto
