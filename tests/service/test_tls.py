"""TLS refusals with real sockets against the Security objects migrated.service.tls builds.

Every refused case checks three things: the peer is refused, the refusal is logged
with the reason, and the protocol behind the TLS layer never saw the connection (its
handler never ran, not one byte of the conversation was parsed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
import typing
from pathlib import Path

import pytest
import trustme

from migrated.errors import AuthorizationError, ConfigError
from migrated.service.tls import PeerAuthorizer, TlsSettings, build_security, peer_identities
from migrated.transport import tls_check
from migrated.transport.security import Security

from .certs import write_tls_dir


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def security(tmp: Path, ca: trustme.CA, name: str, allowed: tuple[str, ...], **kw) -> Security:
    d = write_tls_dir(tmp / name, ca, name, "127.0.0.1", **kw)
    return build_security(TlsSettings(directory=str(d), allowed_peers=allowed))


class Server:
    """A TLS line server: answers each request line with ``ok: LINE``; counts how
    often the protocol behind TLS ran and records every refusal."""

    def __init__(self, sec: Security) -> None:
        self.sec = sec
        self.handled = 0
        self.lines: list[bytes] = []
        self.refusals: list[tuple[str, str]] = []

    async def __aenter__(self) -> Server:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.handled += 1
            line = await r.readline()
            self.lines.append(line)
            w.write(b"ok: " + line)
            await w.drain()
            w.close()

        def refused(peer: str, reason: str) -> None:
            self.refusals.append((peer, reason))
            logging.getLogger("test.refused").warning("refused %s: %s", peer, reason)

        self.server = await tls_check.serve_streams(
            handle, "127.0.0.1", 0, self.sec, on_refused=refused
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def wait_refused(self) -> str:
        for _ in range(200):
            if self.refusals:
                return self.refusals[0][1]
            await asyncio.sleep(0.01)
        raise AssertionError("the server never refused the peer")


async def ask(port: int, sec: Security, line: bytes = b"hello\n") -> bytes:
    r, w = await tls_check.open_stream("127.0.0.1", port, sec)
    try:
        w.write(line)
        await w.drain()
        return await asyncio.wait_for(r.read(), 5)
    finally:
        w.close()


async def test_allowed_peer_talks(tmp_path: Path, ca: trustme.CA) -> None:
    srv = security(tmp_path, ca, "host-b", ("host-a",))
    cli = security(tmp_path, ca, "host-a", ("host-b",))
    async with Server(srv) as s:
        assert await ask(s.port, cli) == b"ok: hello\n"
        assert s.handled == 1 and not s.refusals


async def test_client_without_certificate_refused(tmp_path: Path, ca: trustme.CA) -> None:
    srv = security(tmp_path, ca, "host-b", ("host-a",))
    ctx = ssl.create_default_context(cafile=str(tmp_path / "host-b" / "ca-cert.pem"))
    nocert = Security(client=ctx, authorize=PeerAuthorizer(["host-b"]))
    async with Server(srv) as s:
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            reply = await ask(s.port, nocert)
            assert reply == b""  # TLS 1.3: the refusal shows on the first read
            raise ConnectionError("closed")
        assert "no certificate" in await s.wait_refused()
        assert s.handled == 0 and s.lines == []


async def test_other_ca_refused(tmp_path: Path, ca: trustme.CA) -> None:
    srv = security(tmp_path, ca, "host-b", ("host-a",))
    other = trustme.CA()
    d = write_tls_dir(tmp_path / "rogue", other, "host-a", trust=ca)  # trusts our CA
    rogue = build_security(TlsSettings(directory=str(d), allowed_peers=("host-b",)))
    async with Server(srv) as s:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            if await ask(s.port, rogue) == b"":
                raise ConnectionError("closed")
        reason = await s.wait_refused()
        assert "failed verification" in reason and "issuer" in reason, reason
        assert s.handled == 0


async def test_unlisted_identity_refused(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    srv = security(tmp_path, ca, "host-b", ("host-a",))
    intruder = security(tmp_path, ca, "intruder", ("host-b",))
    async with Server(srv) as s:
        with caplog.at_level(logging.WARNING):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                if await ask(s.port, intruder, b'{"cmd": "prepare-incoming"}\n') == b"":
                    raise ConnectionError("closed")
            reason = await s.wait_refused()
        assert "intruder" in reason and "not authorized" in reason
        assert s.handled == 0 and s.lines == []
        assert "intruder" in caplog.text


async def test_expired_certificate_refused(tmp_path: Path, ca: trustme.CA) -> None:
    srv = security(tmp_path, ca, "host-b", ("host-a",))
    old = security(tmp_path, ca, "host-a", ("host-b",), expired=True)
    async with Server(srv) as s:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            if await ask(s.port, old) == b"":
                raise ConnectionError("closed")
        assert "expired" in await s.wait_refused()
        assert s.handled == 0


async def test_plain_tcp_to_tls_port_refused(tmp_path: Path, ca: trustme.CA) -> None:
    srv = security(tmp_path, ca, "host-b", ("host-a",))
    async with Server(srv) as s:
        r, w = await asyncio.open_connection("127.0.0.1", s.port)
        w.write(b'{"cmd": "prepare-incoming", "name": "web1"}\n')
        await w.drain()
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed, nothing answered
        w.close()
        assert "does not speak TLS" in await s.wait_refused()
        assert s.handled == 0 and s.lines == []


async def test_client_refuses_unlisted_server(tmp_path: Path, ca: trustme.CA) -> None:
    srv = security(tmp_path, ca, "impostor", ("host-a",))
    cli = security(tmp_path, ca, "host-a", ("host-b",))
    async with Server(srv) as s:
        with pytest.raises(AuthorizationError, match="impostor"):
            await ask(s.port, cli)
        assert s.handled == 0 or s.lines == []


async def test_buffered_protocol_gets_early_data(tmp_path: Path, ca: trustme.CA) -> None:
    """Data sent right after the handshake reaches a BufferedProtocol intact (the
    engine's channels are buffered protocols)."""
    srv = security(tmp_path, ca, "host-b", ("host-a",))
    cli = security(tmp_path, ca, "host-a", ("host-b",))
    got = bytearray()
    done = asyncio.get_running_loop().create_future()

    class Buffered(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(7)

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            got.extend(self.buf[:nbytes])
            if len(got) >= 100_000 and not done.done():
                done.set_result(None)

    server = await tls_check.listen(Buffered, "127.0.0.1", 0, srv)
    port = server.sockets[0].getsockname()[1]
    payload = os.urandom(100_000)
    transport, _ = await tls_check.connect(asyncio.Protocol, "127.0.0.1", port, cli)
    typing.cast(asyncio.WriteTransport, transport).write(payload)  # uvloop: no subclass
    await asyncio.wait_for(done, 5)
    assert bytes(got) == payload
    transport.close()
    server.close()


def test_blocking_sockets(tmp_path: Path, ca: trustme.CA) -> None:
    srv = security(tmp_path, ca, "host-b", ("host-a",))
    cli = security(tmp_path, ca, "host-a", ("host-b",))
    intruder = security(tmp_path, ca, "intruder", ("host-b",))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    results: list[object] = []

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            try:
                tls = tls_check.wrap_accepted(conn, srv, on_refused=lambda p, r: None)
                results.append(tls.recv(5))
                tls.close()
            except AuthorizationError as exc:
                results.append(exc)

    t = threading.Thread(target=serve, args=(2,))
    t.start()
    good = tls_check.wrap_connected(socket.create_connection(("127.0.0.1", port)), cli, "127.0.0.1")
    good.sendall(b"pages")
    good.close()
    bad = tls_check.wrap_connected(
        socket.create_connection(("127.0.0.1", port)), intruder, "127.0.0.1"
    )
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        bad.sendall(b"pages")
        if bad.recv(1) == b"":
            raise ConnectionError("closed")
    bad.close()
    t.join(10)
    listener.close()
    assert results[0] == b"pages"
    assert isinstance(results[1], AuthorizationError) and "intruder" in str(results[1])


def test_identities_and_default_deny(tmp_path: Path, ca: trustme.CA) -> None:
    cert = {
        "subject": ((("commonName", "Host-A"),),),
        "subjectAltName": (("DNS", "host-a.example"), ("IP Address", "10.0.0.1")),
    }
    assert peer_identities(cert) == ["Host-A", "host-a.example", "10.0.0.1"]
    PeerAuthorizer(["host-a"])(cert)  # names are case-insensitive
    PeerAuthorizer(["10.0.0.1"])(cert)
    with pytest.raises(AuthorizationError, match="empty"):
        PeerAuthorizer([])(cert)
    with pytest.raises(AuthorizationError, match="no certificate"):
        PeerAuthorizer(["host-a"])({})


def test_configuration_errors(tmp_path: Path, ca: trustme.CA) -> None:
    with pytest.raises(ConfigError, match="missing certificate files"):
        build_security(TlsSettings(directory=str(tmp_path / "none")))
    d = write_tls_dir(tmp_path / "loose", ca, "host-a")
    os.chmod(d / "client-key.pem", 0o644)
    with pytest.raises(ConfigError, match="readable by group or others"):
        build_security(TlsSettings(directory=str(d)))
    with pytest.raises(ConfigError, match=r"tls\.mode"):
        build_security(TlsSettings(mode="tls"))
    assert not build_security(TlsSettings(mode="plain")).tls
