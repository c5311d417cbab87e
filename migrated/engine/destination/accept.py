"""Accepting connections: the receiver's first line against hostile or idle peers.

Every TCP (or TLS) connection to the migration port gets a :class:`Channel` with a
small buffer and a deadline: it must send its ``Hello`` within
``handshake_timeout_s``, and at most ``max_pending`` connections may be waiting for
theirs at once — more are refused at once with ``Error(busy)`` and cost nothing else.
A Hello goes to ``on_hello(channel, hello)`` (the engine adopts the channel into its
session or refuses it).  When the connection closes, everything it held is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from migrated.errors import LinkLost
from migrated.protocol import Error, ErrorCode, Hello, Role
from migrated.protocol.connection import Connection
from migrated.transport import net
from migrated.transport.channel import Channel
from migrated.transport.security import Security
from migrated.transport.tls_check import TlsListener

__all__ = ["Acceptor"]

log = logging.getLogger(__name__)


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
