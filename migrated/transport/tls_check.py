"""TLS on accepted and opened connections, with the peer authorized before any byte
of the conversation reaches the protocol.

Facts we rely on (CPython 3.11 asyncio and uvloop behave alike here):

* ``loop.create_server(..., ssl=ctx)`` logs a failed handshake only in debug mode
  (``ssl.SSLError`` is an ``OSError``), so a refused peer would leave no trace.  We
  therefore accept sockets ourselves and do the handshake with
  ``loop.connect_accepted_socket(ssl=ctx)``, whose failure comes back to us as an
  exception we log.  (Upgrading a server transport with ``start_tls`` instead loses
  the ClientHello on uvloop: uvloop starts reading only after ``connection_made``
  returns, so pausing there has no effect.)
* The handshake may be followed at once by application data (a TLS 1.3 client sends
  as soon as it sent Finished).  Until authorization, that data goes to a holding
  protocol, and only then to the real one; a refused peer's data is dropped unparsed.
* In TLS 1.3 the client finishes its handshake before the server has checked the
  client certificate: a client learns that it was refused on its first read.

:func:`listen` replaces ``loop.create_server``;
:func:`connect` replaces ``loop.create_connection``; :func:`wrap_accepted` and
:func:`wrap_connected` do the same for blocking sockets (threads).  With
``Security.plain()`` each is a pass-through.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from migrated.errors import AuthorizationError

from .security import Security

__all__ = [
    "TlsListener",
    "connect",
    "describe_tls_failure",
    "listen",
    "open_stream",
    "serve_streams",
    "wrap_accepted",
    "wrap_connected",
]

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
Refused = Callable[[str, str], None]  # (peer address, reason)


def describe_tls_failure(exc: BaseException, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> str:
    """A sentence for the log: why a TLS handshake failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate failed verification: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_REQUIRED"):
            return "the peer presented no certificate"
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
            return "the peer does not speak TLS (plain TCP to a TLS port?)"
        if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION"):
            return "the peer does not offer TLS 1.3"
        if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
            return f"certificate refused ({reason.lower().replace('_', ' ')})"
        return f"TLS error: {reason.lower().replace('_', ' ') or exc}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | socket.timeout):
        return f"no TLS handshake within {timeout_s:g} s"
    if isinstance(exc, ConnectionError | EOFError):
        return "the peer closed the connection during the TLS handshake"
    return f"{type(exc).__name__}: {exc}"


def _log_refused(peer: str, reason: str) -> None:
    log.warning("refused connection from %s: %s", peer, reason)


def _peer_text(transport: asyncio.BaseTransport) -> str:
    addr = transport.get_extra_info("peername")
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


class _Holding(asyncio.Protocol):
    """Keeps what arrives between the handshake and authorization."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def hand_over(self, transport: asyncio.BaseTransport, inner: asyncio.BaseProtocol) -> None:
        transport.set_protocol(inner)
        inner.connection_made(transport)
        for chunk in self.data:
            _feed(inner, chunk)
        if self.eof and isinstance(inner, asyncio.Protocol | asyncio.BufferedProtocol):
            inner.eof_received()
        if self.lost is not None:
            inner.connection_lost(self.lost[0])


def _feed(inner: asyncio.BaseProtocol, data: bytes) -> None:
    if isinstance(inner, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = memoryview(inner.get_buffer(len(view)))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            inner.buffer_updated(n)
            view = view[n:]
    elif isinstance(inner, asyncio.Protocol):
        inner.data_received(data)


class TlsListener:
    """A listening socket whose connections are upgraded to TLS and authorized before
    ``inner_factory()`` sees them.  Quacks like the part of ``asyncio.Server`` the
    engines use (``sockets``, ``close()``); it owns its accept loop and every handshake
    in progress, and :meth:`close` cancels them."""

    def __init__(
        self,
        sock: socket.socket,
        inner_factory: Callable[[], asyncio.BaseProtocol],
        security: Security,
        on_refused: Refused | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    ) -> None:
        if security.server is None:
            raise ValueError("TlsListener needs Security.server")
        self.sock = sock
        self.sockets = [sock]
        self.inner_factory = inner_factory
        self.security = security
        self.on_refused = on_refused or _log_refused
        self.timeout_s = handshake_timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        self.refused = 0
        self.accepted = 0

    def start(self) -> None:
        self._accepting = self._spawn(self._accept_loop())

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except OSError as exc:
                if self.sock.fileno() < 0:
                    return  # closed
                log.warning("accept failed on %s: %s", self.sock.getsockname(), exc)
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._upgrade(conn, f"{addr[0]}:{addr[1]}"))

    async def _upgrade(self, conn: socket.socket, peer: str) -> None:
        holder = _Holding()
        loop = asyncio.get_running_loop()
        try:
            tls, _ = await loop.connect_accepted_socket(
                lambda: holder,
                conn,
                ssl=self.security.server,
                ssl_handshake_timeout=self.timeout_s,
            )
        except (TimeoutError, OSError, EOFError) as exc:
            conn.close()
            self._refuse(peer, describe_tls_failure(exc, self.timeout_s))
            return
        try:
            self.security.authorize(tls.get_extra_info("peercert") or {})
        except AuthorizationError as exc:
            tls.abort()
            self._refuse(peer, str(exc))
            return
        self.accepted += 1
        holder.hand_over(tls, self.inner_factory())

    def _refuse(self, peer: str, reason: str) -> None:
        self.refused += 1
        self.on_refused(peer, reason)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.sock.close()

    async def wait_closed(self) -> None:
        tasks = list(self._tasks)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def listen(
    inner_factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    security: Security,
    *,
    on_refused: Refused | None = None,
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
) -> asyncio.Server | TlsListener:
    """Listen on ``host:port``.  With TLS, each connection is accepted, its handshake
    done with ``loop.connect_accepted_socket(ssl=...)`` (so a failure comes back to us
    as an exception), ``security.authorize`` run, and only then ``inner_factory()``
    gets it.  A refused peer is reported with ``on_refused(peer, reason)`` (default: a
    warning on this module's logger).  Plain security: ``loop.create_server``."""
    loop = asyncio.get_running_loop()
    if security.server is None:
        return await loop.create_server(inner_factory, host, port, reuse_address=True)
    sock = socket.create_server((host, port), family=_family(host), reuse_port=False)
    sock.setblocking(False)
    listener = TlsListener(sock, inner_factory, security, on_refused, handshake_timeout_s)
    listener.start()
    return listener


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def connect(
    inner_factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    security: Security,
    *,
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    **kwargs: Any,
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """``loop.create_connection`` with TLS and the server authorized before the
    inner protocol sees the connection.  Raises ``ssl.SSLError`` (handshake) or
    :class:`AuthorizationError` (identity not allowed); ``OSError`` as usual."""
    loop = asyncio.get_running_loop()
    if security.client is None:
        return await loop.create_connection(inner_factory, host, port, **kwargs)
    holder = _Holding()
    transport, _ = await loop.create_connection(
        lambda: holder,
        host,
        port,
        ssl=security.client,
        server_hostname=security.server_hostname or host,
        ssl_handshake_timeout=handshake_timeout_s,
        **kwargs,
    )
    try:
        security.authorize(transport.get_extra_info("peercert") or {})
    except AuthorizationError:
        transport.abort()
        raise
    inner = inner_factory()
    holder.hand_over(transport, inner)
    return transport, inner


# -- streams (the daemon's control connection) -------------------------------------------


async def serve_streams(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    host: str,
    port: int,
    security: Security,
    *,
    limit: int = 1 << 16,
    on_refused: Refused | None = None,
) -> asyncio.Server | TlsListener:
    """``asyncio.start_server`` behind :func:`listen`."""

    def inner() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=limit), handler)

    return await listen(inner, host, port, security, on_refused=on_refused)


async def open_stream(
    host: str, port: int, security: Security, *, limit: int = 1 << 16, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` behind :func:`connect`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    transport, protocol = await connect(
        lambda: asyncio.StreamReaderProtocol(reader), host, port, security, **kwargs
    )
    assert isinstance(protocol, asyncio.StreamReaderProtocol)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
    return reader, writer


# -- blocking sockets (threads) ------------------------------------------------------------


def wrap_accepted(
    sock: socket.socket,
    security: Security,
    *,
    timeout_s: float = HANDSHAKE_TIMEOUT_S,
    on_refused: Refused | None = None,
) -> socket.socket:
    """Server side of a blocking, accepted socket: handshake, authorize, return the
    ``SSLSocket`` (the plain socket when security is plain).  A refused peer is
    reported, the socket closed, and :class:`AuthorizationError` raised."""
    if security.server is None:
        return sock
    refused = on_refused or _log_refused
    try:
        peer_addr = sock.getpeername()
        peer = f"{peer_addr[0]}:{peer_addr[1]}"
    except OSError:
        peer = "?"
    old_timeout = sock.gettimeout()
    sock.settimeout(timeout_s)
    try:
        tls = security.server.wrap_socket(sock, server_side=True)
    except (OSError, EOFError) as exc:
        sock.close()
        reason = describe_tls_failure(exc, timeout_s)
        refused(peer, reason)
        raise AuthorizationError(f"refused {peer}: {reason}") from exc
    try:
        security.authorize(tls.getpeercert() or {})
    except AuthorizationError as exc:
        tls.close()
        refused(peer, str(exc))
        raise
    tls.settimeout(old_timeout)
    return tls


def wrap_connected(
    sock: socket.socket, security: Security, host: str, *, timeout_s: float = HANDSHAKE_TIMEOUT_S
) -> socket.socket:
    """Client side of a blocking, connected socket.  Raises ``ssl.SSLError`` or
    :class:`AuthorizationError` (the socket is then closed)."""
    if security.client is None:
        return sock
    old_timeout = sock.gettimeout()
    sock.settimeout(timeout_s)
    try:
        tls = security.client.wrap_socket(sock, server_hostname=security.server_hostname or host)
    except BaseException:
        sock.close()
        raise
    try:
        security.authorize(tls.getpeercert() or {})
    except AuthorizationError:
        tls.close()
        raise
    tls.settimeout(old_timeout)
    return tls
