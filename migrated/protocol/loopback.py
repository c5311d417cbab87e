"""Two :class:`Connection` s wired together in memory, for tests and benchmarks.

No sockets: bytes returned by one side's ``send`` are fed to the other side's
``receive_data`` (as ``bytes``, the way a socket read would deliver them).  Events are
returned to the caller, never acted on.
"""

from __future__ import annotations

from typing import Any

from migrated.protocol import events as ev
from migrated.protocol.connection import Connection, negotiate
from migrated.protocol.events import ChannelRole, Role
from migrated.protocol.layout import MemoryLayout


def drain(conn: Connection) -> list[Any]:
    """All complete events ``conn`` can produce now (stops at NEED_DATA)."""
    out: list[Any] = []
    while True:
        event = conn.next_event()
        if event is ev.NEED_DATA:
            return out
        out.append(event)
        if type(event) is ev.ConnectionClosed:
            return out


class Loopback:
    """A source and a destination :class:`Connection` of one channel, wired in memory."""

    def __init__(
        self,
        channel: ChannelRole = ChannelRole.MAIN,
        *,
        layout: MemoryLayout | None = None,
        max_frame_payload: int = ev.MAX_PAGES_PAYLOAD_NBYTES,
    ) -> None:
        self.source = Connection(
            Role.SOURCE, channel, layout=layout, max_frame_payload=max_frame_payload
        )
        self.dest = Connection(
            Role.DESTINATION, channel, layout=layout, max_frame_payload=max_frame_payload
        )

    def peer_of(self, conn: Connection) -> Connection:
        return self.dest if conn is self.source else self.source

    def send(self, sender: Connection, event: Any) -> list[Any]:
        """``sender`` sends ``event``; returns the events the peer decodes from it."""
        peer = self.peer_of(sender)
        for buf in sender.send(event):
            peer.receive_data(bytes(buf))
        return drain(peer)

    def handshake(
        self,
        session_id: bytes = b"\x01" * ev.SESSION_ID_NBYTES,
        *,
        source_features: frozenset[str] = ev.KNOWN_FEATURES,
        dest_features: frozenset[str] = ev.KNOWN_FEATURES,
        resume: bool = False,
    ) -> tuple[ev.Hello, ev.Welcome]:
        """Hello → Welcome; returns both events as the peers decoded them."""
        assert self.source.channel is not None  # a source always knows its channel
        hello = ev.Hello(
            ev.PROTOCOL_VERSION,
            ev.MIN_PROTOCOL_VERSION,
            self.source.channel,
            session_id,
            source_features,
            resume,
        )
        (got_hello,) = self.send(self.source, hello)
        (got_welcome,) = self.send(self.dest, negotiate(got_hello, dest_features))
        return got_hello, got_welcome
