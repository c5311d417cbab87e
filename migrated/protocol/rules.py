"""Per-connection rules: who sends what on which channel, and the handshake.

:data:`ROUTES` is the one table, written from the sender's side: for every wire
message, the roles that send it and the channels it may use.  :data:`SENDERS` and
:data:`CHANNEL_RULES` (what the :class:`~migrated.protocol.connection.Connection`
applies once a connection is open) are derived from it, never restated.

:func:`negotiate` builds the destination's ``Welcome`` and :func:`check_welcome` checks
one (both sides use it).  Which channel may be opened in which session state is
:data:`OPENING` (applied by :class:`~migrated.protocol.session.Session`); session-wide
order is :mod:`migrated.protocol.state`'s job.
"""

from __future__ import annotations

import enum

from migrated.errors import ProtocolError, RemoteProtocolError
from migrated.protocol import events as ev
from migrated.protocol.events import ChannelRole, Role

_M, _U, _B = ChannelRole.MAIN, ChannelRole.URGENT, ChannelRole.BULK
_SRC, _DST = frozenset({Role.SOURCE}), frozenset({Role.DESTINATION})
_BOTH = _SRC | _DST
_ALL = frozenset(ChannelRole)

#: message type -> (roles that send it, channels it may use).  Hello and Welcome open
#: every connection (see Connection); Error may end any connection.
ROUTES: dict[type, tuple[frozenset[Role], frozenset[ChannelRole]]] = {
    ev.Hello: (_SRC, _ALL),
    ev.Welcome: (_DST, _ALL),
    ev.Error: (_BOTH, _ALL),
    ev.Progress: (_BOTH, _ALL),
    ev.Setup: (_SRC, frozenset({_M})),
    ev.SetupAck: (_DST, frozenset({_M})),
    ev.Pages: (_SRC, _ALL),
    ev.ZeroPages: (_SRC, _ALL),
    ev.Discard: (_SRC, frozenset({_M})),
    ev.DiscardBitmap: (_SRC, frozenset({_M})),
    ev.PrecopyRoundEnd: (_SRC, frozenset({_M})),
    ev.PrecopyRoundAck: (_DST, frozenset({_M})),
    ev.Switchover: (_SRC, frozenset({_M})),
    ev.VmState: (_SRC, frozenset({_M})),
    ev.Ready: (_DST, frozenset({_M})),
    ev.Commit: (_SRC, frozenset({_M})),
    ev.Running: (_DST, frozenset({_M})),
    # On URGENT; on MAIN only by a destination that has no URGENT connection.
    ev.PageRequest: (_DST, frozenset({_M, _U})),
    ev.AllSent: (_SRC, frozenset({_M})),
    ev.Complete: (_DST, frozenset({_M})),
    ev.CompleteAck: (_SRC, frozenset({_M})),
    ev.Cancel: (_SRC, frozenset({_M})),
    ev.ReceivedBitmap: (_DST, frozenset({_M})),
}
assert set(ROUTES) == set(ev.WIRE_EVENT_TYPES), "every wire message has a route"

#: Which roles may send each wire message.
SENDERS: dict[type, frozenset[Role]] = {t: senders for t, (senders, _) in ROUTES.items()}

#: (channel, sending role) -> message types allowed once the handshake is done.
CHANNEL_RULES: dict[tuple[ChannelRole, Role], frozenset[type]] = {
    (channel, role): frozenset(
        t
        for t, (senders, channels) in ROUTES.items()
        if role in senders and channel in channels and t not in (ev.Hello, ev.Welcome)
    )
    for channel in ChannelRole
    for role in Role
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

    Raises RemoteProtocolError (code "bad-frame") for an empty version range and
    (code "version") naming both version ranges when there is no common version; send
    ``Error(exc.code, str(exc))`` in that case.
    """
    if hello.min_version > hello.version:
        raise RemoteProtocolError(
            f"Hello offers the empty version range {hello.min_version}..{hello.version}",
            code=ev.ErrorCode.BAD_FRAME,
        )
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
        raise error(f"Welcome accepts features never offered: {extra}", code=ev.ErrorCode.FEATURE)
    if welcome.session_id != hello.session_id:
        raise error("Welcome names a different session id than Hello")
