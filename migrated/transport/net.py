"""Sockets: connecting, listening, tuning, and the one place network errors are mapped.

Everything the network can raise (``OSError`` and its subclasses, ``TimeoutError``,
``ssl.SSLError``) is turned into :class:`~migrated.errors.TransportError` by
:func:`map_error`, here and nowhere else; callers above the transport catch our tree,
never tuples of OSError subclasses.  Messages name the address and what was being done.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import Callable

from migrated.errors import AuthorizationError, ConnectFailed, LinkLost, TransportError

from . import tls_check
from .security import Security

__all__ = [
    "connect",
    "connect_blocking",
    "listen",
    "map_error",
    "parse_address",
    "tune_socket",
]

SOCKET_BUFFER_NBYTES = 8 * 1024 * 1024

_CONNECT_ERRNOS = {
    errno.ECONNREFUSED: "connection refused (nothing listens there?)",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "timed out",
    errno.EADDRNOTAVAIL: "address not available",
}


def map_error(exc: BaseException, what: str, *, connecting: bool = False) -> TransportError:
    """Our error for a network failure ``exc`` while doing ``what`` (a phrase naming
    the peer, e.g. ``"connecting to 10.0.0.2:4444"``).  Keeps ``exc`` as the cause."""
    if isinstance(exc, TransportError):
        return exc
    mapped: TransportError
    if isinstance(exc, ssl.SSLCertVerificationError):
        mapped = AuthorizationError(
            f"{what}: the peer's certificate was refused: {exc.verify_message or exc.reason}",
            hint="check that both hosts' certificates are signed by the CA in "
            "/etc/migrated/tls/ca-cert.pem and have not expired",
        )
    elif isinstance(exc, ssl.SSLError):
        mapped = AuthorizationError(
            f"{what}: TLS handshake failed: {exc.reason or exc}",
            hint="both hosts need TLS with certificates from the same CA (or both plain TCP)",
        )
    elif isinstance(exc, TimeoutError):
        cls = ConnectFailed if connecting else LinkLost
        mapped = cls(f"{what}: timed out")
    elif isinstance(exc, ConnectionResetError):
        mapped = LinkLost(f"{what}: connection reset by the peer")
    elif isinstance(exc, BrokenPipeError):
        mapped = LinkLost(f"{what}: the peer closed the connection")
    elif isinstance(exc, OSError):
        text = _CONNECT_ERRNOS.get(exc.errno or 0) or exc.strerror or str(exc)
        cls = ConnectFailed if connecting else LinkLost
        mapped = cls(f"{what}: {text}")
    else:
        mapped = LinkLost(f"{what}: {type(exc).__name__}: {exc}")
    mapped.__cause__ = exc
    return mapped


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[addr]:port``).  Raises ValueError naming the text."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT, e.g. 10.0.0.2:4444")
    return host, int(port_text)


def tune_socket(sock: socket.socket | None, *, bulk: bool) -> None:
    """TCP_NODELAY everywhere (a page request must not wait for Nagle); large socket
    buffers on connections that carry bulk data so the pipe stays full.  Best effort:
    a socket that refuses an option works without it."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if bulk:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_NBYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_NBYTES)


async def connect(
    host: str,
    port: int,
    factory: Callable[[], asyncio.BaseProtocol],
    *,
    security: Security,
    timeout_s: float,
) -> asyncio.BaseProtocol:
    """Open a TCP (or TLS) connection driven by ``factory()``'s protocol; returns the
    protocol.  Raises ConnectFailed / AuthorizationError naming the address."""
    what = f"connecting to {host}:{port}"
    try:
        async with asyncio.timeout(timeout_s):
            _, proto = await tls_check.connect(
                factory, host, port, security, handshake_timeout_s=timeout_s
            )
    except (OSError, ssl.SSLError) as exc:
        raise map_error(exc, what, connecting=True) from exc
    except TimeoutError as exc:
        raise ConnectFailed(f"{what}: timed out after {timeout_s:g} s") from exc
    return proto


def connect_blocking(
    host: str, port: int, *, security: Security, timeout_s: float
) -> socket.socket:
    """A connected blocking socket (TLS-wrapped if configured), for a thread.  Raises
    ConnectFailed / AuthorizationError naming the address."""
    what = f"connecting to {host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout_s)
    except OSError as exc:
        raise map_error(exc, what, connecting=True) from exc
    tune_socket(sock, bulk=True)
    if security.client is None:
        sock.settimeout(None)
        return sock
    try:
        tls = security.client.wrap_socket(sock, server_hostname=security.server_hostname or host)
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise map_error(exc, what, connecting=True) from exc
    tls.settimeout(None)
    return tls


async def listen(
    host: str,
    port: int,
    factory: Callable[[], asyncio.BaseProtocol],
    *,
    security: Security,
) -> asyncio.Server | tls_check.TlsListener:
    """Listen on ``host:port``; with TLS every connection is handshaken and its peer
    authorized (and a refusal logged) before ``factory()`` sees it.  Raises
    ConnectFailed naming the address when it cannot be bound."""
    try:
        return await tls_check.listen(factory, host, port, security)
    except OSError as exc:
        raise ConnectFailed(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="pick another port or stop whatever listens there",
        ) from exc
