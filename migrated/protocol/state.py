"""The migration session state machine: one table per role, in this module only.

:class:`SessionState` is fed every event of a session, from all its channels, in the
order the engine sends or receives them, plus three local events (``LinkLost``,
``BeginRecovery``, ``Abandon``).  :data:`TABLE` maps
``(role, state, direction, event type)`` to the next state or to a :class:`Refusal`;
it is total (a test checks every key).  A refusal raises ``LocalProtocolError`` for
something we sent or a local event, ``RemoteProtocolError`` for something received;
the state does not change, the engine should send ``Error`` (which the table handles).

Deviation from the first design note: the key includes the *direction*, because
``Error`` and ``Progress`` travel both ways and a source that sent ``Error`` after
``VmState`` must behave differently from one that received it.  One extra state from
QEMU's vocabulary, ``DEVICE``, covers "VmState sent/received, guest not yet known to
run on the destination".

The point of no return
----------------------
``MigrationState.after_point_of_no_return`` is true for POSTCOPY_ACTIVE,
POSTCOPY_PAUSED, POSTCOPY_RECOVER and COMPLETED: the destination has (or may have) run
the guest and the source must never run it again.  :attr:`SessionState.point_of_no_return`
is sticky: once crossed, it stays true even in FAILED.  Before it, every failure ends in
FAILED or CANCELLED with the VM still on the source.

The source in DEVICE does not know whether the destination already runs the guest, so
link loss (or an Error it sends) moves it to POSTCOPY_PAUSED, never to FAILED.  Only an
``Error`` *received on MAIN* in DEVICE proves the destination never ran the guest
(the destination sends Running and its refusal on MAIN, which is ordered), and moves
the source to FAILED with the point of no return not crossed.  An Error received on
another channel in DEVICE counts as link loss.

After the point of no return, ``Error`` either way and link loss both lead to
POSTCOPY_PAUSED: the guest lives on the destination and only recovery (or the operator's
``Abandon``) ends the session.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from migrated.errors import LocalProtocolError, RemoteProtocolError
from migrated.protocol import events as ev
from migrated.protocol.events import ChannelRole, Role


class MigrationState(enum.Enum):
    """Session states, named as QEMU names its migration status values."""

    SETUP = "setup"
    ACTIVE = "active"  # precopy
    SWITCHOVER = "switchover"  # source paused the VM; final pages
    DEVICE = "device"  # VmState sent; guest not yet confirmed running on the destination
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def after_point_of_no_return(self) -> bool:
        """The destination has run the guest: the source must never run it again."""
        return self in _AFTER_PNR

    @property
    def terminal(self) -> bool:
        return self in (MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.CANCELLED)


_AFTER_PNR = frozenset(
    {
        MigrationState.POSTCOPY_ACTIVE,
        MigrationState.POSTCOPY_PAUSED,
        MigrationState.POSTCOPY_RECOVER,
        MigrationState.COMPLETED,
    }
)


class Direction(enum.Enum):
    SENT = "sent"
    RECEIVED = "received"
    LOCAL = "local"


@dataclass(frozen=True, slots=True)
class Refusal:
    """An explicit "not allowed" entry of the table."""

    code: str
    reason: str


SESSION_EVENT_TYPES: tuple[type, ...] = ev.WIRE_EVENT_TYPES + ev.LOCAL_EVENT_TYPES

#: Which roles may send each wire message (Progress and Error travel both ways).
SENDERS: dict[type, frozenset[Role]] = {
    t: frozenset({Role.SOURCE})
    for t in (
        ev.Hello,
        ev.Setup,
        ev.Pages,
        ev.ZeroPages,
        ev.Discard,
        ev.DiscardBitmap,
        ev.PrecopyRoundEnd,
        ev.Switchover,
        ev.VmState,
        ev.AllSent,
        ev.CompleteAck,
        ev.Cancel,
    )
}
SENDERS.update(
    {
        t: frozenset({Role.DESTINATION})
        for t in (
            ev.Welcome,
            ev.SetupAck,
            ev.Running,
            ev.PageRequest,
            ev.Complete,
            ev.ReceivedBitmap,
        )
    }
)
SENDERS[ev.Progress] = SENDERS[ev.Error] = frozenset({Role.SOURCE, Role.DESTINATION})

S = MigrationState
_SENT, _RECV, _LOCAL = Direction.SENT, Direction.RECEIVED, Direction.LOCAL
_PRE_RUN = (S.SETUP, S.ACTIVE, S.SWITCHOVER, S.DEVICE)
_OPEN_CHANNELS = (*_PRE_RUN, S.POSTCOPY_ACTIVE)
_DONE = (S.FAILED, S.CANCELLED)

# Rules: (states, direction, event types, next state or None for "stay").  Written from
# the sender's point of view; the tables below turn them into per-role entries.
_Rule = tuple[tuple[MigrationState, ...], Direction, tuple[type, ...], "MigrationState | None"]

_SOURCE_RULES: list[_Rule] = [
    # Opening extra channels (URGENT, BULK) at any time the session is healthy.
    (_OPEN_CHANNELS, _SENT, (ev.Hello,), None),
    (_OPEN_CHANNELS, _RECV, (ev.Welcome,), None),
    ((S.SETUP,), _SENT, (ev.Setup,), None),
    ((S.SETUP,), _RECV, (ev.SetupAck,), S.ACTIVE),
    (
        (S.ACTIVE,),
        _SENT,
        (ev.Pages, ev.ZeroPages, ev.Discard, ev.DiscardBitmap, ev.PrecopyRoundEnd),
        None,
    ),
    ((S.ACTIVE,), _SENT, (ev.Switchover,), S.SWITCHOVER),
    ((S.SWITCHOVER,), _SENT, (ev.Pages, ev.ZeroPages, ev.Discard, ev.DiscardBitmap), None),
    ((S.SWITCHOVER,), _SENT, (ev.VmState,), S.DEVICE),
    ((S.SETUP, S.ACTIVE, S.SWITCHOVER), _SENT, (ev.Cancel,), S.CANCELLED),
    ((S.SETUP, S.ACTIVE, S.SWITCHOVER), _SENT, (ev.Error,), S.FAILED),
    ((S.SETUP, S.ACTIVE, S.SWITCHOVER, S.DEVICE), _RECV, (ev.Error,), S.FAILED),
    ((S.SETUP, S.ACTIVE, S.SWITCHOVER), _LOCAL, (ev.LinkLost,), S.FAILED),
    (_OPEN_CHANNELS, _SENT, (ev.Progress,), None),
    (_OPEN_CHANNELS, _RECV, (ev.Progress,), None),
    # DEVICE: the guest may already run on the destination.
    ((S.DEVICE,), _SENT, (ev.Pages, ev.ZeroPages), None),
    ((S.DEVICE,), _RECV, (ev.Running, ev.PageRequest), S.POSTCOPY_ACTIVE),
    ((S.DEVICE,), _SENT, (ev.Error,), S.POSTCOPY_PAUSED),
    ((S.DEVICE,), _LOCAL, (ev.LinkLost,), S.POSTCOPY_PAUSED),
    # Postcopy.
    ((S.POSTCOPY_ACTIVE,), _SENT, (ev.Pages, ev.ZeroPages, ev.AllSent), None),
    ((S.POSTCOPY_ACTIVE,), _RECV, (ev.PageRequest,), None),
    ((S.POSTCOPY_ACTIVE,), _RECV, (ev.Complete,), S.COMPLETED),
    ((S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER), _SENT, (ev.Error,), S.POSTCOPY_PAUSED),
    ((S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER), _RECV, (ev.Error,), S.POSTCOPY_PAUSED),
    ((S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER), _LOCAL, (ev.LinkLost,), S.POSTCOPY_PAUSED),
    # Paused and recovering.
    ((S.POSTCOPY_PAUSED,), _LOCAL, (ev.LinkLost,), None),
    ((S.POSTCOPY_PAUSED,), _LOCAL, (ev.BeginRecovery,), S.POSTCOPY_RECOVER),
    ((S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER), _LOCAL, (ev.Abandon,), S.FAILED),
    ((S.POSTCOPY_PAUSED,), _SENT, (ev.Hello,), S.POSTCOPY_RECOVER),
    ((S.POSTCOPY_PAUSED,), _SENT, (ev.Error,), None),
    ((S.POSTCOPY_PAUSED,), _RECV, (ev.Error,), None),
    ((S.POSTCOPY_RECOVER,), _SENT, (ev.Hello,), None),
    ((S.POSTCOPY_RECOVER,), _RECV, (ev.Welcome,), None),
    ((S.POSTCOPY_RECOVER,), _RECV, (ev.ReceivedBitmap,), S.POSTCOPY_ACTIVE),
    # Completed: late messages that crossed Complete are tolerated (and ignored).
    ((S.COMPLETED,), _SENT, (ev.CompleteAck, ev.AllSent, ev.Progress, ev.Error), None),
    ((S.COMPLETED,), _RECV, (ev.PageRequest, ev.Progress, ev.Error), None),
    ((S.COMPLETED,), _LOCAL, (ev.LinkLost,), None),
    (_DONE, _SENT, (ev.Error,), None),
    (_DONE, _RECV, (ev.Error,), None),
    (_DONE, _LOCAL, (ev.LinkLost,), None),
]

_DEST_RULES: list[_Rule] = [
    (_OPEN_CHANNELS, _RECV, (ev.Hello,), None),
    (_OPEN_CHANNELS, _SENT, (ev.Welcome,), None),
    ((S.SETUP,), _RECV, (ev.Setup,), None),
    ((S.SETUP,), _SENT, (ev.SetupAck,), S.ACTIVE),
    (
        (S.ACTIVE,),
        _RECV,
        (ev.Pages, ev.ZeroPages, ev.Discard, ev.DiscardBitmap, ev.PrecopyRoundEnd),
        None,
    ),
    ((S.ACTIVE,), _RECV, (ev.Switchover,), S.SWITCHOVER),
    ((S.SWITCHOVER,), _RECV, (ev.Pages, ev.ZeroPages, ev.Discard, ev.DiscardBitmap), None),
    ((S.SWITCHOVER,), _RECV, (ev.VmState,), S.DEVICE),
    ((S.SETUP, S.ACTIVE, S.SWITCHOVER), _RECV, (ev.Cancel,), S.CANCELLED),
    (_PRE_RUN, _SENT, (ev.Error,), S.FAILED),
    (_PRE_RUN, _RECV, (ev.Error,), S.FAILED),
    (_PRE_RUN, _LOCAL, (ev.LinkLost,), S.FAILED),
    (_OPEN_CHANNELS, _SENT, (ev.Progress,), None),
    (_OPEN_CHANNELS, _RECV, (ev.Progress,), None),
    ((S.DEVICE,), _RECV, (ev.Pages, ev.ZeroPages), None),
    ((S.DEVICE,), _SENT, (ev.Running,), S.POSTCOPY_ACTIVE),
    ((S.POSTCOPY_ACTIVE,), _RECV, (ev.Pages, ev.ZeroPages, ev.AllSent), None),
    ((S.POSTCOPY_ACTIVE,), _SENT, (ev.PageRequest, ev.Complete), None),
    ((S.POSTCOPY_ACTIVE,), _RECV, (ev.CompleteAck,), S.COMPLETED),
    ((S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER), _SENT, (ev.Error,), S.POSTCOPY_PAUSED),
    ((S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER), _RECV, (ev.Error,), S.POSTCOPY_PAUSED),
    ((S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER), _LOCAL, (ev.LinkLost,), S.POSTCOPY_PAUSED),
    ((S.POSTCOPY_PAUSED,), _LOCAL, (ev.LinkLost,), None),
    ((S.POSTCOPY_PAUSED,), _LOCAL, (ev.BeginRecovery,), S.POSTCOPY_RECOVER),
    ((S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER), _LOCAL, (ev.Abandon,), S.FAILED),
    ((S.POSTCOPY_PAUSED,), _RECV, (ev.Hello,), S.POSTCOPY_RECOVER),
    ((S.POSTCOPY_PAUSED,), _SENT, (ev.Error,), None),
    ((S.POSTCOPY_PAUSED,), _RECV, (ev.Error,), None),
    ((S.POSTCOPY_RECOVER,), _RECV, (ev.Hello,), None),
    ((S.POSTCOPY_RECOVER,), _SENT, (ev.Welcome,), None),
    ((S.POSTCOPY_RECOVER,), _SENT, (ev.ReceivedBitmap,), S.POSTCOPY_ACTIVE),
    ((S.COMPLETED,), _RECV, (ev.Pages, ev.ZeroPages, ev.AllSent, ev.Progress, ev.Error), None),
    ((S.COMPLETED,), _SENT, (ev.Progress, ev.Error), None),
    ((S.COMPLETED,), _LOCAL, (ev.LinkLost,), None),
    (_DONE, _SENT, (ev.Error,), None),
    (_DONE, _RECV, (ev.Error,), None),
    (_DONE, _LOCAL, (ev.LinkLost,), None),
]

TableKey = tuple[Role, MigrationState, Direction, type]
TABLE: dict[TableKey, MigrationState | Refusal] = {}


def _refusal(role: Role, state: MigrationState, direction: Direction, t: type) -> Refusal:
    name = t.__name__
    if direction is Direction.LOCAL:
        if t not in ev.LOCAL_EVENT_TYPES:
            return Refusal(ev.ErrorCode.PROTOCOL, f"{name} is a wire message, not a local event")
        return Refusal(ev.ErrorCode.PROTOCOL, f"{name} is not possible in state {state.value}")
    if t not in ev.WIRE_EVENT_TYPES:
        return Refusal(ev.ErrorCode.PROTOCOL, f"{name} never travels on the wire")
    sender = role if direction is Direction.SENT else role.peer
    if sender not in SENDERS[t]:
        return Refusal(ev.ErrorCode.UNEXPECTED, f"the {sender.value} never sends {name}")
    if t is ev.Cancel and state in (S.DEVICE, *_AFTER_PNR):
        return Refusal(
            ev.ErrorCode.CANCEL_REFUSED,
            f"Cancel refused in state {state.value}: the destination may run the guest; "
            "postcopy cannot be cancelled",
        )
    verb = "send" if direction is Direction.SENT else "receive"
    return Refusal(
        ev.ErrorCode.UNEXPECTED,
        f"the {role.value} may not {verb} {name} in state {state.value}",
    )


def _build() -> None:
    for role, rules in ((Role.SOURCE, _SOURCE_RULES), (Role.DESTINATION, _DEST_RULES)):
        for states, direction, types, target in rules:
            for state in states:
                for t in types:
                    key = (role, state, direction, t)
                    if key in TABLE:
                        raise RuntimeError(f"duplicate transition rule {key}")
                    TABLE[key] = state if target is None else target
        for state in MigrationState:
            for direction in Direction:
                for t in SESSION_EVENT_TYPES:
                    key = (role, state, direction, t)
                    if key not in TABLE:
                        TABLE[key] = _refusal(role, state, direction, t)


_build()


class SessionState:
    """The state of one migration session, seen by one role.

    ``handle(event, direction)`` applies the table and returns the new state, or raises
    LocalProtocolError (sent/local event refused) / RemoteProtocolError (received
    event refused) without changing state.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = MigrationState.SETUP
        self._crossed = False

    @property
    def point_of_no_return(self) -> bool:
        """True once the destination has (or may have) run the guest.  Sticky."""
        return self._crossed

    def handle(
        self,
        event: Any,
        direction: str | Direction,
        *,
        channel: ChannelRole = ChannelRole.MAIN,
    ) -> MigrationState:
        """Apply one event sent or received on ``channel``; returns the new state."""
        direction = Direction(direction)
        t = type(event)
        state = self.state
        if (
            t is ev.Error
            and direction is Direction.RECEIVED
            and state is S.DEVICE
            and self.role is Role.SOURCE
            and channel is not ChannelRole.MAIN
        ):
            # Not ordered with Running: it proves nothing about the guest.
            return self._apply(ev.LinkLost(), Direction.LOCAL)
        if t is ev.Hello:
            needs_resume = state in (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER)
            if (needs_resume and not event.resume) or (state in _PRE_RUN and event.resume):
                error = LocalProtocolError if direction is Direction.SENT else RemoteProtocolError
                raise error(
                    f"Hello(resume={event.resume}) is not allowed in state {state.value}",
                    code=ev.ErrorCode.UNEXPECTED,
                )
        return self._apply(event, direction)

    def _apply(self, event: Any, direction: Direction) -> MigrationState:
        entry = TABLE.get((self.role, self.state, direction, type(event)))
        if entry is None:
            entry = Refusal(ev.ErrorCode.PROTOCOL, f"{type(event).__name__} is not an event")
        if isinstance(entry, Refusal):
            if direction is Direction.RECEIVED:
                raise RemoteProtocolError(entry.reason, code=entry.code)
            raise LocalProtocolError(entry.reason, code=entry.code)
        self.state = entry
        if entry in _AFTER_PNR:
            self._crossed = True
        return entry

    def link_lost(self) -> MigrationState:
        """A channel failed: POSTCOPY_PAUSED past the point of no return, else FAILED."""
        return self._apply(ev.LinkLost(), Direction.LOCAL)

    def begin_recovery(self) -> MigrationState:
        """Start the recovery handshake: POSTCOPY_PAUSED → POSTCOPY_RECOVER."""
        return self._apply(ev.BeginRecovery(), Direction.LOCAL)

    def abandon(self) -> MigrationState:
        """Give up a paused postcopy migration: → FAILED (point of no return stays crossed)."""
        return self._apply(ev.Abandon(), Direction.LOCAL)

    def __repr__(self) -> str:
        return (
            f"SessionState(role={self.role.value}, state={self.state.value}, "
            f"point_of_no_return={self._crossed})"
        )
