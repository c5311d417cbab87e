"""One migration session, sans-IO: its connections, its state table, its timers.

A :class:`Session` owns the :class:`Connection` objects of every TCP connection of one
migration (MAIN, URGENT, BULK, and their replacements after recovery) and feeds its
:class:`SessionState` from **every** event it sends or receives on any of them
(h11's model: nobody feeds the table by hand).  Time is an input (aioquic's model):
:meth:`data_received` notes when bytes arrived, :meth:`next_timer` says when the next
deadline falls, :meth:`handle_timer` returns what is due — a heartbeat to send, a MAIN
connection that went silent, a handshake that took too long.

Connection-level events stay connection-level: ``Hello``/``Welcome`` never touch the
table (:data:`~migrated.protocol.state.OPENING` says which connection may be opened
when), and an ``Error`` that refuses a Hello only ends that connection.  Losing MAIN
or URGENT is link loss for the session; losing BULK is not (MAIN's heartbeat decides).

Threads: the source's push thread and the destination's BULK receiver call
:meth:`send` / :meth:`next_event` for their own connection while the event loop uses
the others.  Only page events travel there, which never change the state (see
:class:`SessionState`); byte counts are kept per connection (each connection is used
by one thread at a time); the registry of connections changes only on the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from migrated.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from migrated.protocol import events as ev
from migrated.protocol.connection import Connection
from migrated.protocol.events import ChannelRole, Role
from migrated.protocol.layout import MemoryLayout
from migrated.protocol.rules import Phase, negotiate
from migrated.protocol.state import (
    Direction,
    MigrationState,
    SessionState,
    page_channel_allowed,
)

__all__ = [
    "HandshakeTimeout",
    "HeartbeatDue",
    "LinkSilent",
    "Session",
    "TimerEvent",
]

S = MigrationState
#: States in which both sides send heartbeats on MAIN and watch for the peer's.
WATCHED = frozenset(
    {S.SETUP, S.ACTIVE, S.SWITCHOVER, S.DEVICE, S.READY, S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER}
)


@dataclass(frozen=True, slots=True)
class HeartbeatDue:
    """Send :meth:`Session.heartbeat` on ``conn`` (MAIN) now."""

    conn: Connection


@dataclass(frozen=True, slots=True)
class LinkSilent:
    """Nothing arrived on MAIN for ``silent_s`` seconds: the session applied link loss;
    close every connection.  ``reason`` is the sentence to report."""

    conn: Connection
    silent_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class HandshakeTimeout:
    """``conn`` did not finish its Hello/Welcome exchange in time: close it."""

    conn: Connection
    reason: str


TimerEvent = HeartbeatDue | LinkSilent | HandshakeTimeout


@dataclass(eq=False)
class _Info:
    channel: ChannelRole
    opened_at: float
    last_rx: float
    payload_bytes: int = 0


@dataclass
class _Timers:
    heartbeat_interval_s: float
    silence_timeout_s: float
    handshake_timeout_s: float
    last_heartbeat: float = field(default=float("-inf"))


class Session:
    """One migration session seen by one role.  See the module docstring.

    ``pages_remaining()`` (the engine's count of pages the destination lacks) feeds the
    heartbeat.  ``features`` are offered (source) or accepted (destination).
    """

    def __init__(
        self,
        role: Role,
        session_id: bytes,
        *,
        features: frozenset[str] = frozenset(),
        layout: MemoryLayout | None = None,
        max_frame_payload: int = ev.MAX_PAGES_PAYLOAD_NBYTES,
        pages_remaining: Callable[[], int] = lambda: 0,
        heartbeat_interval_s: float = 1.0,
        silence_timeout_s: float = 5.0,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        if len(session_id) != ev.SESSION_ID_NBYTES:
            raise ValueError(f"session ids are {ev.SESSION_ID_NBYTES} bytes")
        self.role = role
        self.session_id = session_id
        self.features = features
        self.layout = layout
        self.max_frame_payload = max_frame_payload
        self.table = SessionState(role)
        self.main: Connection | None = None
        self.urgent: Connection | None = None
        #: Why the link was last lost (a sentence), for outcomes and logs.
        self.lost_reason = ""
        self._pages_remaining = pages_remaining
        self._conns: dict[Connection, _Info] = {}
        self._closed_payload_bytes = 0
        self._timers = _Timers(heartbeat_interval_s, silence_timeout_s, handshake_timeout_s)

    # -- state -------------------------------------------------------------------------

    @property
    def state(self) -> MigrationState:
        return self.table.state

    @property
    def point_of_no_return(self) -> bool:
        return self.table.point_of_no_return

    @property
    def connections(self) -> list[Connection]:
        return list(self._conns)

    def channel_of(self, conn: Connection) -> ChannelRole | None:
        info = self._conns.get(conn)
        return None if info is None else info.channel

    @property
    def payload_bytes(self) -> int:
        """Page payload bytes sent (source) or received (destination), all channels."""
        return self._closed_payload_bytes + sum(i.payload_bytes for i in self._conns.values())

    def heartbeat(self) -> ev.Progress:
        return ev.Progress(self.payload_bytes, self._pages_remaining())

    # -- opening connections ------------------------------------------------------------

    def connect(
        self, channel: ChannelRole, *, resume: bool, now: float
    ) -> tuple[Connection, list[bytes | memoryview]]:
        """Source: a new connection for ``channel`` and the Hello to write on it.
        Raises LocalProtocolError when such a connection may not be opened now."""
        if self.role is not Role.SOURCE:
            raise LocalProtocolError("only the source opens connections")
        if not self.table.may_open(channel, resume, Direction.SENT):
            raise LocalProtocolError(
                f"a {'resumed' if resume else 'new'} {channel.name} connection may not be "
                f"opened in state {self.state.value}",
                code=ev.ErrorCode.UNEXPECTED,
            )
        layout = None if channel is ChannelRole.MAIN and not resume else self.layout
        conn = Connection(
            Role.SOURCE, channel, layout=layout, max_frame_payload=self.max_frame_payload
        )
        hello = ev.Hello(
            ev.PROTOCOL_VERSION,
            ev.MIN_PROTOCOL_VERSION,
            channel,
            self.session_id,
            self.features,
            resume,
        )
        data = conn.send(hello)
        self._register(conn, channel, now)
        return conn, data

    def accept(self, conn: Connection, hello: ev.Hello, now: float) -> ev.Welcome:
        """Destination: adopt ``conn``, whose Hello was just decoded, into the session;
        returns the Welcome to send (with :meth:`send`).  Raises RemoteProtocolError
        (code ``busy``, ``unexpected``, ``version``...) when it must be refused: send
        ``Error(exc.code, str(exc))`` on the connection and close it."""
        if self.role is not Role.DESTINATION:
            raise LocalProtocolError("only the destination accepts connections")
        if hello.session_id != self.session_id:
            raise RemoteProtocolError(
                "this destination serves another migration session",
                code=ev.ErrorCode.SESSION_UNKNOWN,
            )
        if not self.table.may_open(hello.role, hello.resume, Direction.RECEIVED):
            if hello.resume and self.state in (S.FAILED, S.CANCELLED):
                raise RemoteProtocolError(
                    f"the session ended here ({self.state.value}) before the guest ran; "
                    "the VM is the source's",
                    code=ev.ErrorCode.SESSION_FAILED,
                )
            kind = "resumed" if hello.resume else "new"
            raise RemoteProtocolError(
                f"a {kind} {hello.role.name} connection is not accepted in state "
                f"{self.state.value}",
                code=ev.ErrorCode.BUSY
                if hello.role is ChannelRole.MAIN and not hello.resume
                else ev.ErrorCode.UNEXPECTED,
            )
        welcome = negotiate(hello, self.features)
        if self.layout is not None and conn.layout is None:
            conn.set_layout(self.layout)
        self._register(conn, hello.role, now)
        return welcome

    def _register(self, conn: Connection, channel: ChannelRole, now: float) -> None:
        self._conns[conn] = _Info(channel, now, now)
        if channel is ChannelRole.MAIN:
            self.main = conn
            self._timers.last_heartbeat = now
        elif channel is ChannelRole.URGENT:
            self.urgent = conn

    # -- traffic -----------------------------------------------------------------------

    def send(self, conn: Connection, event: Any) -> list[bytes | memoryview]:
        """Encode ``event`` for ``conn`` after the table allowed it; returns the buffers
        to write.  Raises LocalProtocolError (nothing sent, state unchanged)."""
        t = type(event)
        if t is ev.Pages or t is ev.ZeroPages:
            # The hot path: no state change, the table only needs to allow it.
            self.table.check(event, Direction.SENT)
            self._check_page_channel(conn, t, LocalProtocolError)
            data = conn.send(event)
            if t is ev.Pages:
                self._conns[conn].payload_bytes += len(data[1])
            return data
        if not self._session_level(conn, t):
            return conn.send(event)
        self.table.check(event, Direction.SENT)
        data = conn.send(event)
        self.table.handle(event, Direction.SENT)
        return data

    def next_event(self, conn: Connection) -> Any:
        """The next event of ``conn`` (or NEED_DATA / ConnectionClosed), after the
        table accepted it.  Raises RemoteProtocolError for anything refused; after
        that the connection must be closed (an Error naming it may be sent first)."""
        return self.receive(conn, conn.next_event())

    def receive(self, conn: Connection, event: Any) -> Any:
        """Account for ``event``, just decoded by ``conn`` itself, and feed it to the
        table (what :meth:`next_event` does after decoding; separate so a test hook
        can act between the two).  Raises like :meth:`next_event`."""
        t = type(event)
        if event is ev.NEED_DATA or t is ev.ConnectionClosed:
            return event
        if t is ev.Pages or t is ev.ZeroPages:
            try:
                self._check_page_channel(conn, t, RemoteProtocolError)
            except ProtocolError as exc:
                conn.poison(exc)
                raise
            info = self._conns.get(conn)
            if info is not None and t is ev.Pages:
                assert event.data is not None
                info.payload_bytes += event.data.nbytes
        if t is ev.Setup and self.layout is None:
            self.layout = event.layout
        if not self._session_level(conn, t):
            return event
        try:
            self.table.handle(event, Direction.RECEIVED)
        except ProtocolError as exc:
            conn.poison(exc)
            raise
        return event

    def _check_page_channel(self, conn: Connection, t: type, error: type[ProtocolError]) -> None:
        channel = self.channel_of(conn)
        if channel is not None and not page_channel_allowed(self.state, channel):
            raise error(
                f"{t.__name__} on {channel.name} in state {self.state.value}: before Commit "
                "page frames travel on MAIN only",
                code=ev.ErrorCode.UNEXPECTED,
            )

    def _session_level(self, conn: Connection, t: type) -> bool:
        """Whether an event of type ``t`` on ``conn`` concerns the session table."""
        if t is ev.Hello or t is ev.Welcome:
            return False
        if t is ev.Error:
            # Refusing (or being refused) a Hello ends that connection only.
            return conn in self._conns and conn.phase is Phase.OPEN
        return True

    def add_payload_bytes(self, conn: Connection, nbytes: int) -> None:
        """Count page payload bytes that travelled on ``conn`` without passing through
        :meth:`send`/:meth:`next_event` (the kernel layer's page loops)."""
        info = self._conns.get(conn)
        if info is not None:
            info.payload_bytes += nbytes

    def data_received(self, conn: Connection, now: float) -> None:
        """Bytes arrived on ``conn`` (the adapter calls this on every read)."""
        info = self._conns.get(conn)
        if info is not None:
            info.last_rx = now

    def silent_for(self, conn: Connection, now: float) -> float:
        """Seconds since bytes last arrived on ``conn`` (infinite if unknown)."""
        info = self._conns.get(conn)
        return float("inf") if info is None else now - info.last_rx

    def connection_lost(self, conn: Connection, reason: str) -> MigrationState:
        """``conn`` is gone (closed, reset, refused, timed out).  Losing MAIN or URGENT
        is link loss for the session (the table decides what that means in the
        current state); losing BULK is not.  Returns the session state."""
        info = self._conns.pop(conn, None)
        if info is None:
            return self.state
        self._closed_payload_bytes += info.payload_bytes
        if conn is self.main:
            self.main = None
        if conn is self.urgent:
            self.urgent = None
        if info.channel is ChannelRole.BULK:
            return self.state
        if reason:
            self.lost_reason = reason
        return self.table.link_lost()

    # -- time --------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """The monotonic time of the next deadline, or None."""
        deadlines = [
            info.opened_at + self._timers.handshake_timeout_s
            for conn, info in self._conns.items()
            if conn.phase is not Phase.OPEN
        ]
        main = self.main
        if main is not None and main.phase is Phase.OPEN and self.state in WATCHED:
            info = self._conns[main]
            deadlines.append(self._timers.last_heartbeat + self._timers.heartbeat_interval_s)
            deadlines.append(info.last_rx + self._timers.silence_timeout_s)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[TimerEvent]:
        """What is due at ``now``.  A silent MAIN is treated as lost here (the table
        moves), so the caller only has to close the connections."""
        due: list[TimerEvent] = []
        for conn, info in list(self._conns.items()):
            if conn.phase is Phase.OPEN or now < info.opened_at + self._timers.handshake_timeout_s:
                continue
            reason = (
                f"the {info.channel.name} connection did not complete its handshake within "
                f"{self._timers.handshake_timeout_s:g} s"
            )
            due.append(HandshakeTimeout(conn, reason))
        main = self.main
        if main is None or main.phase is not Phase.OPEN or self.state not in WATCHED:
            return due
        silent_s = now - self._conns[main].last_rx
        if silent_s >= self._timers.silence_timeout_s:
            peer = self.role.peer.value
            reason = f"no heartbeat from the {peer} for {silent_s:.1f} s"
            self.connection_lost(main, reason)
            due.append(LinkSilent(main, silent_s, reason))
            return due
        if now >= self._timers.last_heartbeat + self._timers.heartbeat_interval_s:
            self._timers.last_heartbeat = now
            due.append(HeartbeatDue(main))
        return due

    def __repr__(self) -> str:
        return (
            f"Session(role={self.role.value}, id={self.session_id.hex()}, "
            f"state={self.state.value}, connections={len(self._conns)})"
        )
