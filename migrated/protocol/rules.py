"""Per-connection rules: which role may send what on which channel, and the handshake.

:data:`CHANNEL_RULES` is the table the :class:`~migrated.protocol.connection.Connection`
applies once a connection is open; :func:`negotiate` builds the destination's
``Welcome`` and :func:`check_welcome` checks one (both sides use it).  Session-wide
order is :mod:`migrated.protocol.state`'s job.
"""

from __future__ import annotations

import enum

from migrated.errors import ProtocolError, RemoteProtocolError
from migrated.protocol import events as ev
from migrated.protocol.events import ChannelRole, Role

_M, _U, _B = ChannelRole.MAIN, ChannelRole.URGENT, ChannelRole.BULK
_SRC, _DST = Role.SOURCE, Role.DESTINATION

#: (channel, sending role) -> message types allowed once the handshake is done.
CHANNEL_RULES: dict[tuple[ChannelRole, Role], frozenset[type]] = {
    (_M, _SRC): frozenset(
        {
            ev.Setup,
            ev.Pages,
            ev.ZeroPages,
            ev.Discard,
            ev.DiscardBitmap,
            ev.PrecopyRoundEnd,
            ev.Switchover,
            ev.VmState,
            ev.Progress,
            ev.AllSent,
            ev.CompleteAck,
            ev.Cancel,
            ev.Error,
        }
    ),
    (_M, _DST): frozenset(
        {
            ev.SetupAck,
            ev.Running,
            ev.PageRequest,
            ev.Progress,
            ev.Complete,
            ev.ReceivedBitmap,
            ev.Error,
        }
    ),
    (_U, _SRC): frozenset({ev.Pages, ev.ZeroPages, ev.Progress, ev.Error}),
    (_U, _DST): frozenset({ev.PageRequest, ev.Progress, ev.Error}),
    (_B, _SRC): frozenset({ev.Pages, ev.ZeroPages, ev.Progress, ev.Error}),
    (_B, _DST): frozenset({ev.Progress, ev.Error}),
}


class Phase(enum.Enum):
    """Handshake progress of one connection."""

    START = "start"  # nothing exchanged
    HANDSHAKE = "handshake"  # Hello sent (source) / received (destination)
    OPEN = "open"  # Welcome exchanged
    CLOSED = "closed"  # Hello refused with Error


def negotiate(
    hello: ev.Hello,
    local_features: frozenset[str],
    *,
    version: int = ev.PROTOCOL_VERSION,
    min_version: int = ev.MIN_PROTOCOL_VERSION,
) -> ev.Welcome:
    """The destination's ``Welcome`` for ``hello``: highest common version, feature
    intersection, same session id.

    Raises RemoteProtocolError (code "version") naming both version ranges when there
    is no common version; send ``Error(exc.code, str(exc))`` in that case.
    """
    agreed = min(version, hello.version)
    if agreed < max(min_version, hello.min_version):
        raise RemoteProtocolError(
            f"protocol version mismatch: peer speaks {hello.min_version}..{hello.version}, "
            f"we speak {min_version}..{version}",
            code=ev.ErrorCode.VERSION,
            hint="upgrade migrated on one of the hosts so both share a protocol version",
        )
    return ev.Welcome(agreed, hello.features & local_features, hello.session_id)


def check_welcome(hello: ev.Hello, welcome: ev.Welcome, error: type[ProtocolError]) -> None:
    """Raise ``error`` (code "version", "feature" or "protocol") unless ``welcome`` is a
    valid answer to ``hello``: common version, offered features only, same session."""
    if not (
        max(hello.min_version, ev.MIN_PROTOCOL_VERSION)
        <= welcome.version
        <= min(hello.version, ev.PROTOCOL_VERSION)
    ):
        raise error(
            f"protocol version mismatch: Welcome chose version {welcome.version}, "
            f"Hello offered {hello.min_version}..{hello.version}",
            code=ev.ErrorCode.VERSION,
        )
    if not welcome.features <= hello.features:
        extra = sorted(welcome.features - hello.features)
        raise error(f"Welcome accepts features never offered: {extra}", code="feature")
    if welcome.session_id != hello.session_id:
        raise error("Welcome names a different session id than Hello")
