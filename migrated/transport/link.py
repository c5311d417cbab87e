"""One migration's connections on the event loop: the owner of a Session's channels.

A :class:`Link` owns the sans-IO :class:`~migrated.protocol.session.Session` of one
migration, the :class:`Channel` of each of its connections on the loop, the
:class:`BlockingChannel` of each connection lent to a thread, and the one timer the
session asks for (heartbeats, silence, handshake deadlines).  The engine gets every
event through ``on_event(channel, event)`` and every closed connection through
``on_lost(channel, error)``, both on the loop; it never touches sockets.

Everything that mutates the session's registry of connections runs on the loop;
threads only send and receive on their own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from migrated.errors import (
    LinkLost,
    MigratedError,
    PeerRefused,
    RemoteProtocolError,
    TransportError,
)
from migrated.protocol import ChannelRole, Error, ErrorCode, Welcome
from migrated.protocol.connection import Connection
from migrated.protocol.session import HandshakeTimeout, HeartbeatDue, LinkSilent, Session

from . import net
from .blocking import BlockingChannel
from .channel import Channel
from .faults import FaultPlan
from .security import Security

__all__ = ["Link"]

log = logging.getLogger(__name__)

OnEvent = Callable[[Channel, Any], None]
#: ``on_lost(channel or None, error or None)``; None channel: a thread's connection.
OnLost = Callable[["Channel | BlockingChannel", "BaseException | None"], None]


class Link:
    """See the module docstring.  ``fault`` arms the test hook (transport.faults)."""

    def __init__(
        self,
        session: Session,
        *,
        security: Security,
        on_event: OnEvent,
        on_lost: OnLost,
        fault: FaultPlan | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.security = security
        self.fault = fault
        self._on_event = on_event
        self._on_lost = on_lost
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self.channels: dict[Connection, Channel] = {}
        self.threads: dict[Connection, BlockingChannel] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    # -- opening -----------------------------------------------------------------------

    async def open(
        self,
        channel: ChannelRole,
        host: str,
        port: int,
        *,
        resume: bool = False,
        timeout_s: float = 10.0,
    ) -> Channel:
        """Source: connect, send the Hello, wait for the Welcome.  Events that follow
        the Welcome in the same read already go to ``on_event``.  Raises ConnectFailed,
        AuthorizationError, PeerRefused (the destination answered Error), LinkLost."""
        conn, hello = self.session.connect(channel, resume=resume, now=self._clock())
        welcome: asyncio.Future[Welcome] = self._loop.create_future()
        name = channel.name.lower()

        def handshake(ch: Channel, event: Any) -> None:
            if isinstance(event, Welcome):
                ch.on_event = self._on_event
                welcome.set_result(event)
            elif isinstance(event, Error):
                welcome.set_exception(
                    PeerRefused(
                        f"the destination refused the {channel.name} connection: {event.message}",
                        code=event.code,
                    )
                )
            else:  # Connection only lets Welcome or Error through first
                raise RemoteProtocolError(f"{type(event).__name__} before Welcome")

        ch = Channel(
            conn,
            name=name,
            on_event=handshake,
            security=self.security,
            bulk=channel is not ChannelRole.URGENT,
            clock=self._clock,
        )
        try:
            await net.connect(host, port, lambda: ch, security=self.security, timeout_s=timeout_s)
            ch.attach(self.session, name)
            self._adopt(ch)
            ch.write_raw(hello)
            waiters: list[asyncio.Future[Any]] = [welcome, ch.closed]
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if welcome.done():
                welcome.result()  # raises PeerRefused
                return ch
            exc = ch.closed.exception() if ch.closed.done() else None
            raise exc or LinkLost(
                f"no Welcome from {host}:{port} on the {channel.name} connection within "
                f"{timeout_s:g} s: no answer from the peer (it accepted the connection)"
            )
        except BaseException:
            ch.abort()
            self._forget(conn, "")
            raise
        finally:
            if not welcome.done():
                welcome.cancel()
            elif not welcome.cancelled():
                welcome.exception()

    def accept(self, ch: Channel, hello: Any) -> bool:
        """Destination: adopt a fresh connection whose Hello was decoded into this
        session and send the Welcome.  On refusal an Error goes back, the connection
        closes, and False is returned."""
        try:
            welcome = self.session.accept(ch.conn, hello, self._clock())
        except RemoteProtocolError as exc:
            log.warning("refused a %s connection from %s: %s", hello.role.name, ch.peer, exc)
            with contextlib.suppress(TransportError):  # gone already: nothing to tell
                ch.send(Error(exc.code, str(exc)[:4000]))
            ch.close()
            return False
        ch.attach(self.session, hello.role.name.lower())
        ch.on_event = self._on_event
        self._adopt(ch)
        ch.send(welcome)
        return True

    def _adopt(self, ch: Channel) -> None:
        ch.fault = self.fault
        ch.on_fault = self.cut_by_fault
        self.channels[ch.conn] = ch
        ch.closed.add_done_callback(lambda fut: self._channel_closed(ch, fut))
        self._arm()

    # -- threads -----------------------------------------------------------------------

    def lend(self, ch: Channel) -> tuple[int, Connection]:
        """Hand an accepted channel's socket to a thread: returns (fd, connection); the
        owner wraps them in a BlockingChannel and registers it with :meth:`adopt_thread`."""
        self.channels.pop(ch.conn, None)
        return ch.detach(), ch.conn

    def connect_thread(self, channel: ChannelRole, *, resume: bool) -> tuple[Connection, list[Any]]:
        """Source: a connection (and its Hello) for a thread that connects by itself."""
        conn, hello = self.session.connect(channel, resume=resume, now=self._clock())
        self._arm()
        return conn, hello

    def adopt_thread(self, bc: BlockingChannel) -> None:
        bc.fault = self.fault

        def cut_from_thread() -> None:
            self._loop.call_soon_threadsafe(self.cut_by_fault)

        bc.on_fault = cut_from_thread
        self.threads[bc.conn] = bc

    def thread_closed(self, bc: BlockingChannel, exc: BaseException | None) -> None:
        """On the loop, once the thread using ``bc`` has ended."""
        self.threads.pop(bc.conn, None)
        self._forget(bc.conn, "" if exc is None else str(exc))
        self._on_lost(bc, exc)

    # -- sending -----------------------------------------------------------------------

    @property
    def main(self) -> Channel | None:
        conn = self.session.main
        return None if conn is None else self.channels.get(conn)

    @property
    def urgent(self) -> Channel | None:
        conn = self.session.urgent
        return None if conn is None else self.channels.get(conn)

    def send_main(self, event: Any) -> None:
        """Send on MAIN.  Raises LinkLost when there is no open MAIN connection."""
        main = self.main
        if main is None:
            raise LinkLost(
                self.session.lost_reason or f"no MAIN connection to send {type(event).__name__} on"
            )
        main.send(event)

    # -- losing and closing ------------------------------------------------------------

    def _channel_closed(self, ch: Channel, fut: asyncio.Future[None]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if self.channels.get(ch.conn) is ch:
            del self.channels[ch.conn]
            self._forget(ch.conn, "" if exc is None else str(exc))
        if not self._closing:
            self._on_lost(ch, exc)
        self._arm()

    def _forget(self, conn: Connection, reason: str) -> None:
        self.session.connection_lost(conn, reason)

    def cut(self, reason: str) -> None:
        """Abort every connection now (RST), threads' too.  The session treats it as
        link loss with ``reason``."""
        if reason:
            self.session.lost_reason = reason
        for conn in list(self.channels):
            self.session.connection_lost(conn, reason)
        for ch in list(self.channels.values()):
            ch.abort()
        for bc in list(self.threads.values()):
            bc.stop()

    def cut_by_fault(self) -> None:
        assert self.fault is not None
        self.cut(f"fault injected ({self.fault.describe()})")

    def close(self) -> None:
        """Close every connection on purpose (end of the migration), without
        notifications.  Threads must have been stopped and joined by their owners."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for ch in list(self.channels.values()):
            ch.close()
        self.channels.clear()

    # -- the session's timer -------------------------------------------------------------

    def _arm(self) -> None:
        if self._closing:
            return
        deadline = self.session.next_timer()
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        loop_deadline = self._loop.time() + (deadline - self._clock())
        if self._timer is not None and self._timer.when() <= loop_deadline:
            return  # fires earlier; it re-arms for whatever is due then
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(loop_deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        for due in self.session.handle_timer(self._clock()):
            if isinstance(due, HeartbeatDue):
                ch = self.channels.get(due.conn)
                if ch is not None and ch.is_open:
                    try:
                        ch.send(self.session.heartbeat())
                    except TransportError as exc:
                        log.info("heartbeat not sent: %s", exc)
            elif isinstance(due, LinkSilent):
                log.warning("link lost: %s", due.reason)
                ch = self.channels.get(due.conn)
                if ch is not None and ch.is_open:  # name it to the peer, if it still hears
                    with contextlib.suppress(MigratedError):
                        ch.send(Error(ErrorCode.TIMEOUT, due.reason))
                self.cut(due.reason)
            elif isinstance(due, HandshakeTimeout):
                ch = self.channels.get(due.conn)
                log.warning("%s", due.reason)
                if ch is not None:
                    ch.abort()
        self._arm()
