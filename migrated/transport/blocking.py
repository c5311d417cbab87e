"""The one adapter that drives a :class:`Connection` over a blocking socket, for threads.

Both BULK threads use it: the source's pusher (which connects and sends its Hello
here) and the destination's receiver (which gets an accepted socket handed over by
the event loop, see :meth:`~migrated.transport.channel.Channel.detach`).

Facts we rely on:

* The GIL is released inside every ``sendmsg``/``recv_into``, so a thread blocked on
  the network costs the event loop nothing.
* A socket handed over by the loop stays non-blocking underneath (file status flags
  are shared between dups); ``settimeout`` puts Python's socket object in timeout
  mode, which polls, so the thread blocks as it should.
* :meth:`BlockingChannel.stop` may be called from any thread: ``shutdown(SHUT_RDWR)``
  wakes a thread blocked in send or receive, which then ends.
* ``ssl.SSLSocket`` has no ``sendmsg``: over TLS each buffer is written with
  ``sendall`` (TLS copies into records anyway).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

from migrated.errors import LinkLost, TransportError
from migrated.protocol import NEED_DATA, ConnectionClosed
from migrated.protocol.connection import Connection
from migrated.protocol.session import Session

from .channel import send_queue_empty
from .faults import FaultPlan
from .net import map_error

__all__ = ["BlockingChannel"]

log = logging.getLogger(__name__)

_RECV_NBYTES = 1 << 20


class BlockingChannel:
    """``conn`` (attached to ``session``) over the blocking ``sock``, used by one
    thread.  Errors are our tree: LinkLost for the network, the session's
    ProtocolErrors for bad frames."""

    def __init__(
        self,
        sock: socket.socket,
        conn: Connection,
        session: Session,
        *,
        name: str,
        fault: FaultPlan | None = None,
        on_fault: Callable[[], None] | None = None,
        idle_timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sock, self.conn, self.session, self.name = sock, conn, session, name
        self.fault, self.on_fault = fault, on_fault
        self.bytes_received = 0
        self.stopped = False
        self._clock = clock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._scratch = memoryview(bytearray(_RECV_NBYTES))
        sock.settimeout(idle_timeout_s)
        try:
            peer = sock.getpeername()
            self.peer = f"{peer[0]}:{peer[1]}"
        except OSError:
            self.peer = "?"

    def _what(self) -> str:
        return f"the {self.name} connection to {self.peer}"

    # -- sending ---------------------------------------------------------------------

    def write(self, bufs: list[Any]) -> int:
        """Write every buffer; returns the bytes written.  Raises LinkLost."""
        views = [memoryview(b).cast("B") for b in bufs]
        total = sum(v.nbytes for v in views)
        try:
            if self._tls:
                for v in views:
                    self.sock.sendall(v)
                return total
            while views:
                n = self.sock.sendmsg(views)
                while n:
                    if n >= views[0].nbytes:
                        n -= views[0].nbytes
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0
        except (OSError, ValueError) as exc:
            raise self._lost(exc) from exc
        return total

    def send(self, event: Any) -> int:
        """Encode ``event`` through the session and write it; returns bytes written."""
        fault = self.fault
        if fault is not None and fault.due(event, sent=True, before=True):
            self._cut()
            raise LinkLost(f"fault injected before sending {type(event).__name__}")
        n = self.write(self.session.send(self.conn, event))
        if fault is not None and fault.due(event, sent=True, before=False):
            deadline = self._clock() + 2.0
            while not send_queue_empty(self.sock) and self._clock() < deadline:
                time.sleep(0.001)
            self._cut()
        return n

    # -- receiving -------------------------------------------------------------------

    def events(self) -> Iterator[Any]:
        """Every event of the connection, in order, as it arrives (payloads go to the
        connection's sink).  Returns at a clean end of the stream; raises LinkLost on a
        reset or an end inside a frame, the session's ProtocolError on a bad frame."""
        conn, sock, scratch = self.conn, self.sock, self._scratch
        fault = self.fault
        while not self.stopped:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if type(event) is ConnectionClosed:
                    return
                if fault is not None and fault.due(event, sent=False, before=True):
                    self._cut()
                    raise LinkLost(f"fault injected on receiving {type(event).__name__}")
                yield self.session.receive(conn, event)
                if fault is not None and fault.due(event, sent=False, before=False):
                    self._cut()
                    raise LinkLost(f"fault injected after {type(event).__name__}")
            target = conn.payload_target()
            try:
                if target is not None:
                    n = sock.recv_into(target, min(target.nbytes, _RECV_NBYTES))
                else:
                    n = sock.recv_into(scratch)
            except TimeoutError:
                continue  # idle: MAIN's heartbeat decides whether the link is alive
            except (OSError, ValueError) as exc:
                if self.stopped:
                    return
                raise self._lost(exc) from exc
            self.bytes_received += n
            self.session.data_received(conn, self._clock())
            if n and target is not None:
                conn.payload_written(n)
            else:
                conn.receive_data(scratch[:n] if n else b"")

    # -- ending ----------------------------------------------------------------------

    def _lost(self, exc: BaseException) -> TransportError:
        return map_error(exc, self._what())

    def _cut(self) -> None:
        if self.on_fault is not None:
            self.on_fault()
        self.stop()

    def stop(self) -> None:
        """Wake the thread using this channel and make it end (any thread, idempotent)."""
        self.stopped = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
