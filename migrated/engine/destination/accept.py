"""Accepting connections and adopting them into the session.

The receiver's first line against hostile or idle peers: every TCP (or TLS)
connection to the migration port gets a :class:`Channel` with a small buffer and a
deadline: it must send its ``Hello`` within ``handshake_timeout_s``, and at most
``max_pending`` connections may be waiting for theirs at once — more are refused at
once with ``Error(busy)`` and cost nothing else.  A Hello goes to :func:`on_hello`,
which adopts the channel into the session (opening it on a fresh MAIN) or refuses it.
When a connection closes, everything it held is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from migrated.errors import LinkLost, MigratedError
from migrated.protocol import (
    FEATURE_CHECKSUM_CRC32,
    FEATURE_CHECKSUM_XXH3,
    ChannelRole,
    Complete,
    Error,
    ErrorCode,
    Hello,
    Ready,
    ReceivedBitmap,
    Role,
)
from migrated.protocol.connection import Connection
from migrated.protocol.session import Session
from migrated.protocol.state import MigrationState
from migrated.transport import net
from migrated.transport.blocking import BlockingChannel
from migrated.transport.channel import Channel
from migrated.transport.link import Link
from migrated.transport.security import Security
from migrated.transport.tls_check import TlsListener

from ..ram import PAGE_SIZE
from . import guest, receive
from .bulk import BulkReceiver

if TYPE_CHECKING:
    from .engine import DestinationEngine

__all__ = ["Acceptor", "on_hello"]

log = logging.getLogger(__name__)
S = MigrationState
LOCAL_FEATURES = frozenset({FEATURE_CHECKSUM_XXH3, FEATURE_CHECKSUM_CRC32})


class _Refuse(asyncio.Protocol):
    """A connection over the limit: one Error frame, then close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        conn = Connection(Role.DESTINATION, None)
        try:
            tr.write(b"".join(bytes(b) for b in conn.send(Error(ErrorCode.BUSY, _BUSY))))
        except Exception as exc:  # a Connection refusing to encode Error is our bug: say so
            log.error("could not encode the busy refusal: %s", exc)
        tr.close()


_BUSY = "too many connections are waiting for their handshake here; retry later"


class Acceptor:
    def __init__(
        self,
        *,
        security: Security,
        on_hello: Callable[[Channel, Hello], None],
        max_pending: int,
        handshake_timeout_s: float,
        max_frame_nbytes: int,
    ) -> None:
        self.security = security
        self._on_hello = on_hello
        self.max_pending = max_pending
        self.handshake_timeout_s = handshake_timeout_s
        self.max_frame_nbytes = max_frame_nbytes
        self._pending: dict[Channel, asyncio.TimerHandle] = {}
        self._server: asyncio.Server | TlsListener | None = None
        self.refused = 0

    async def listen(self, host: str, port: int) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        self._server = await net.listen(host, port, self._factory, security=self.security)
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _factory(self) -> asyncio.BaseProtocol:
        if len(self._pending) >= self.max_pending:
            self.refused += 1
            return _Refuse()
        conn = Connection(Role.DESTINATION, None, max_frame_payload=self.max_frame_nbytes)
        ch = Channel(
            conn,
            name="incoming",
            on_event=self._on_event,
            security=self.security,
            bulk=True,
            bounded_reads=True,
        )
        loop = asyncio.get_running_loop()
        self._pending[ch] = loop.call_later(self.handshake_timeout_s, self._too_slow, ch)
        ch.closed.add_done_callback(lambda _: self._drop(ch))
        return ch

    def _drop(self, ch: Channel) -> None:
        timer = self._pending.pop(ch, None)
        if timer is not None:
            timer.cancel()

    def _too_slow(self, ch: Channel) -> None:
        self._pending.pop(ch, None)
        log.warning(
            "closed a connection from %s: no Hello within %g s", ch.peer, self.handshake_timeout_s
        )
        if ch.is_open:
            with contextlib.suppress(LinkLost):
                ch.send(Error(ErrorCode.TIMEOUT, f"no Hello within {self.handshake_timeout_s:g} s"))
            ch.close()

    def _on_event(self, ch: Channel, event: object) -> None:
        # The bare Connection only lets a Hello (or an Error) through first.
        self._drop(ch)
        if isinstance(event, Hello):
            self._on_hello(ch, event)
        else:
            ch.close()

    def close(self) -> None:
        """Stop listening and drop every connection still in its handshake."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for ch in list(self._pending):
            ch.abort()
        self._pending.clear()


# -- adopting a connection into the session ------------------------------------------------


def on_hello(eng: DestinationEngine, ch: Channel, hello: Hello) -> None:
    if eng.session is None:
        if hello.role is not ChannelRole.MAIN or hello.resume:
            ch.send(Error(ErrorCode.SESSION_UNKNOWN, "no migration session here"))
            ch.close()
            return
        open_session(eng, hello)
    assert eng.session is not None and eng.link is not None
    session = eng.session
    if hello.session_id != session.session_id:
        code = ErrorCode.BUSY if not hello.resume else ErrorCode.SESSION_UNKNOWN
        ch.send(Error(code, "this destination is receiving another migration"))
        ch.close()
        return
    if len(session.connections) >= eng.opts.max_session_connections:
        ch.send(Error(ErrorCode.BUSY, "too many connections for this session"))
        ch.close()
        return
    if hello.role is ChannelRole.MAIN and hello.resume:
        before_resume(eng)
    if not eng.link.accept(ch, hello):
        return
    ch.conn.set_payload_sink(lambda header: receive.sink(eng, ch, header))
    if hello.role is ChannelRole.MAIN and hello.resume:
        answer_resume(eng, ch)
    elif hello.role is ChannelRole.URGENT and eng.faults is not None:
        eng.faults.reissue()
    elif hello.role is ChannelRole.BULK:
        start_bulk(eng, ch)


def open_session(eng: DestinationEngine, hello: Hello) -> None:
    eng.t0 = time.monotonic()
    eng.session = Session(
        Role.DESTINATION,
        hello.session_id,
        features=LOCAL_FEATURES,
        max_frame_payload=eng.opts.max_frame_nbytes,
        pages_remaining=lambda: 0 if eng.store is None else eng.store.total_pages - eng.store.count,
        heartbeat_interval_s=eng.opts.heartbeat_interval_s,
        silence_timeout_s=eng.opts.heartbeat_timeout_s,
        handshake_timeout_s=eng.opts.handshake_timeout_s,
    )
    eng.link = Link(
        eng.session,
        security=eng.security,
        on_event=eng._on_event,
        on_lost=eng._on_lost,
        fault=eng.fault,
    )


def before_resume(eng: DestinationEngine) -> None:
    """A resumed MAIN: drop old connections we have not seen fail yet."""
    assert eng.session is not None and eng.link is not None
    state = eng.session.state
    if state in (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER):
        eng.link.cut("the source reconnected: the old connections are stale")
    if eng.session.state is S.POSTCOPY_PAUSED:
        eng.session.table.begin_recovery()


def answer_resume(eng: DestinationEngine, ch: Channel) -> None:
    assert eng.session is not None and eng.store is not None
    if eng.session.state is S.READY:
        ch.send(Ready())  # still waiting for the Commit
        eng.log.info("the source reconnected while the state is held in doubt")
        return
    if eng.store.complete and eng.guest_started:
        # Everything is here: the source only needs to hear it (again).
        ch.send(Complete(eng.store.count))
        if not eng.complete_sent:
            eng.complete_sent = True
            eng.own(guest.finish(eng))
        eng.log.info("the source reconnected after every page arrived: Complete")
        return
    ch.send(ReceivedBitmap(memoryview(eng.store.snapshot())))
    eng.stats.recoveries += 1
    eng.log.event("recovered", "postcopy recovered (the source reconnected)")
    eng.state_event()


def start_bulk(eng: DestinationEngine, ch: Channel) -> None:
    """Lend a BULK connection to its receiver thread (not possible over TLS: then
    it stays on the loop and its frames go to the installer)."""
    assert eng.link is not None and eng.store is not None
    if ch.transport is not None and ch.transport.get_extra_info("ssl_object") is not None:
        return
    fd, conn = eng.link.lend(ch)
    bc = BlockingChannel(
        socket.socket(fileno=fd), conn, eng.link.session, name="bulk", idle_timeout_s=30.0
    )
    eng.link.adopt_thread(bc)
    receiver = BulkReceiver(
        bc,
        eng.store,
        partial(receive.after_install, eng),
        max_frame_nbytes=eng.opts.max_frame_nbytes,
    )
    eng.bulk.append(receiver)
    receiver.worker.start()
    eng.own(watch_bulk(eng, receiver))


async def watch_bulk(eng: DestinationEngine, receiver: BulkReceiver) -> None:
    exc: BaseException | None = None
    try:
        await receiver.worker.join()
    except MigratedError as err:
        exc = err
        eng.log.info("BULK connection ended: %s", err)
    except Exception as err:  # a bug: the BULK connection is lost, not the migration
        exc = err
        eng.log.error("the BULK receiver failed: %s", err, exc_info=err)
    finally:
        receiver.bc.close()
        eng.stats.postcopy_bytes += receiver.normal_pages * PAGE_SIZE
        eng.stats.normal_pages += receiver.normal_pages
        eng.stats.zero_pages += receiver.zero_pages
        receiver.normal_pages = receiver.zero_pages = 0
        if eng.link is not None:
            eng.link.thread_closed(receiver.bc, exc)
        if receiver in eng.bulk:
            eng.bulk.remove(receiver)
