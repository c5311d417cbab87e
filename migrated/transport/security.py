"""Transport security for migration connections: TLS contexts and peer authorization.

The service layer builds a :class:`Security` from its configuration (certificates in
QEMU's layout, the list of allowed peer identities); the engine passes it to the
transport, which wraps every connection (MAIN, URGENT, BULK) with it.  ``authorize``
runs after the TLS handshake and before any migration message is read, so a refused
peer never reaches the protocol.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Security"]


def _allow_any(peercert: dict[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class Security:
    """``client`` connects (source side), ``server`` accepts (destination side).
    ``authorize(peercert)`` raises :class:`migrated.errors.AuthorizationError` naming the
    identity and why it is refused.  ``server_hostname`` is the name the source checks
    in the destination's certificate (None: the address it connects to)."""

    client: ssl.SSLContext | None = None
    server: ssl.SSLContext | None = None
    authorize: Callable[[dict[str, Any]], None] = _allow_any
    server_hostname: str | None = None

    @classmethod
    def plain(cls) -> Security:
        """No TLS: plain TCP (only when configured explicitly)."""
        return cls()

    @property
    def tls(self) -> bool:
        return self.client is not None or self.server is not None
