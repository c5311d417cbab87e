"""Mutual TLS 1.3 from certificates in QEMU/libvirt's layout, and default-deny
authorization of the peer's identity.

Layout of the TLS directory (default ``/etc/migrated/tls``, as QEMU's ``tls-creds-x509``
``dir=``)::

    ca-cert.pem      the CA that signs every host of the cluster (trusted for both ends)
    server-cert.pem  this host's certificate when it accepts (destination, daemon port)
    server-key.pem
    client-cert.pem  this host's certificate when it connects (source)
    client-key.pem

One certificate may serve as both (the same file twice).  Keys must not be readable
by group or others.

Authorization (QEMU's ``tls-authz`` idea): after the handshake, the peer's
certificate must name one of ``allowed_peers`` as its subject common name, a DNS
subject alternative name or an IP-address SAN (exact, case-insensitive match for
names).  An empty list allows nobody: default deny.  Both ends check: the destination
checks the source's client certificate, the source checks the destination's server
certificate (on top of the usual hostname verification against the address it
dialled, or ``server_name``).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrated.errors import AuthorizationError, ConfigError
from migrated.transport.security import Security

__all__ = ["PeerAuthorizer", "TlsSettings", "build_security", "peer_identities"]

FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


@dataclass(frozen=True)
class TlsSettings:
    """``mode``: ``mtls`` (default) or ``plain`` (no encryption, no authentication:
    only on an isolated network, and a warning is logged at start)."""

    mode: str = "mtls"
    directory: str = "/etc/migrated/tls"
    allowed_peers: tuple[str, ...] = ()
    #: the name to verify in the destination's certificate instead of the address
    server_name: str | None = None


def peer_identities(peercert: dict[str, Any]) -> list[str]:
    """Every identity a certificate (``SSLSocket.getpeercert()`` form) claims:
    subject common names, DNS and IP-address SANs."""
    names: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(value)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "IP Address"):
            names.append(value)
    return names


def _normalize(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name.strip()))
    except ValueError:
        return name.strip().lower().rstrip(".")


class PeerAuthorizer:
    """``authorize(peercert)`` for :class:`Security`: raises AuthorizationError unless
    the certificate names an allowed peer."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = frozenset(_normalize(a) for a in allowed)

    def __call__(self, peercert: dict[str, Any]) -> None:
        if not peercert:
            raise AuthorizationError(
                "the peer presented no certificate",
                hint="give the peer a client certificate signed by this cluster's CA",
            )
        names = peer_identities(peercert)
        if any(_normalize(n) in self.allowed for n in names):
            return
        shown = ", ".join(names) or "no common name or SAN"
        if not self.allowed:
            why = "tls.allowed_peers is empty (default deny)"
        else:
            why = "not in tls.allowed_peers"
        raise AuthorizationError(
            f"peer identity {shown} is not authorized: {why}",
            hint="add one of its names to tls.allowed_peers in migrated.toml if it is "
            "one of your hosts",
        )


def _check_files(directory: Path) -> dict[str, Path]:
    paths = {name: directory / name for name in FILES}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ConfigError(
            f"tls: missing certificate files: {', '.join(missing)}",
            hint="create them as docs/operations.md describes (QEMU's layout), or set "
            'tls.mode = "plain" on an isolated network',
        )
    for key in ("server-key.pem", "client-key.pem"):
        mode = os.stat(paths[key]).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"tls: {paths[key]} is readable by group or others (mode {mode & 0o777:o})",
                hint=f"chmod 600 {paths[key]}",
            )
    return paths


def _context(purpose: str, paths: dict[str, Path], cert: str, key: str) -> ssl.SSLContext:
    proto = ssl.PROTOCOL_TLS_SERVER if purpose == "server" else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(proto)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_verify_locations(cafile=str(paths["ca-cert.pem"]))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls: cannot load {paths['ca-cert.pem']}: {exc}") from exc
    try:
        ctx.load_cert_chain(str(paths[cert]), str(paths[key]))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"tls: cannot load {paths[cert]} with {paths[key]}: {exc}",
            hint="the key must be the certificate's, in PEM, without a passphrase",
        ) from exc
    ctx.verify_mode = ssl.CERT_REQUIRED  # the server asks for and checks a client cert
    if purpose == "client":
        ctx.check_hostname = True
    return ctx


def build_security(settings: TlsSettings) -> Security:
    """The :class:`Security` for every migration channel and the daemon port.
    Raises ConfigError naming the file or key that is wrong."""
    if settings.mode == "plain":
        return Security.plain()
    if settings.mode != "mtls":
        raise ConfigError(f'tls.mode: expected "mtls" or "plain", got {settings.mode!r}')
    directory = Path(settings.directory)
    paths = _check_files(directory)
    return Security(
        client=_context("client", paths, "client-cert.pem", "client-key.pem"),
        server=_context("server", paths, "server-cert.pem", "server-key.pem"),
        authorize=PeerAuthorizer(settings.allowed_peers),
        server_hostname=settings.server_name,
    )
