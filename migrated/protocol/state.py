"""The migration session state machine: one table, in this module only.

:data:`MESSAGE_RULES` is written once per message from the sender's side: in which of
its states the sender may send it and where that takes it, and in which states the
receiver accepts it and where that takes *it*.  The receiver's list includes every
state the receiver can have moved on to while the message was in flight on another
connection (MAIN, URGENT and BULK are separate TCP streams with no order between
them); a test explores every interleaving of two peers to prove the lists complete.
Errors and the local events (``LinkLost``, ``BeginRecovery``, ``Abandon``) have their
own per-role rules, :data:`LOCAL_RULES` and :data:`ERROR_RULES`.  :data:`OPENING`
says in which states each kind of connection may be opened.

:data:`TABLE` maps ``(role, state, direction, event type)`` to the next state or to a
:class:`Refusal`; it is total over the session event types.  ``SessionState.handle``
applies it: a refusal raises ``LocalProtocolError`` for something we sent or a local
event, ``RemoteProtocolError`` for something received; the state does not change.

The commit point
----------------
``VmState`` is followed by ``Ready`` (destination → source: it holds the whole state
and can run it) and ``Commit`` (source → destination).  *Sending* Commit is the
source's point of no return; *receiving* it is the destination's, which only then runs
the guest.  :attr:`SessionState.point_of_no_return` is sticky.

* Before sending Commit, every failure of the source ends in FAILED or CANCELLED and
  the VM resumes on the source: the destination cannot run it without Commit.
* A destination in READY does not know whether Commit is on its way.  Link loss and
  any Error leave it in READY, holding the state: only ``Commit`` (run), ``Cancel``
  (the source kept the VM) or the operator's ``Abandon`` end the doubt.  A resumed
  MAIN connection is answered with ``Ready`` again, and the source sends ``Commit`` if
  it had committed or ``Cancel`` if it had resumed the VM.
* After the point of no return, Error and link loss lead to POSTCOPY_PAUSED: the
  guest runs on the destination, the source keeps the rest of its memory, and only
  recovery (or ``Abandon``) ends the paused state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from migrated.errors import LocalProtocolError, RemoteProtocolError
from migrated.protocol import events as ev
from migrated.protocol.events import ChannelRole, Role
from migrated.protocol.rules import SENDERS


class MigrationState(enum.Enum):
    """Session states, named as QEMU names its migration status values."""

    SETUP = "setup"
    ACTIVE = "active"  # precopy
    SWITCHOVER = "switchover"  # source paused the VM; final pages
    DEVICE = "device"  # VmState sent / received
    READY = "ready"  # the destination holds the complete state and waits for Commit
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (MigrationState.COMPLETED, MigrationState.FAILED, MigrationState.CANCELLED)


class Direction(enum.Enum):
    SENT = "sent"
    RECEIVED = "received"
    LOCAL = "local"


@dataclass(frozen=True, slots=True)
class Refusal:
    """An explicit "not allowed" entry of the table."""

    code: str
    reason: str


S = MigrationState
_SRC, _DST = Role.SOURCE, Role.DESTINATION
_SENT, _RECV, _LOCAL = Direction.SENT, Direction.RECEIVED, Direction.LOCAL
#: Before the commit: the source still owns the VM.
BEFORE_COMMIT = (S.SETUP, S.ACTIVE, S.SWITCHOVER, S.DEVICE, S.READY)
_LIVE = (*BEFORE_COMMIT, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER)
_ENDED = (S.FAILED, S.CANCELLED)
_ANY = tuple(MigrationState)
_STOPS = frozenset({S.FAILED, S.CANCELLED, S.POSTCOPY_PAUSED})

Moves = dict[MigrationState, MigrationState]


def same(*states: MigrationState) -> Moves:
    """Each state stays as it is."""
    return {s: s for s in states}


def to(target: MigrationState, *states: MigrationState) -> Moves:
    return {s: target for s in states}


@dataclass(frozen=True)
class MessageRule:
    """``sender`` may send ``message`` in the states of ``sent`` (moving as it says);
    the peer accepts it in the states of ``received``."""

    message: type
    sender: Role
    sent: Moves
    received: Moves


#: One row per message (two for Progress, which both sides send).  See the module notes.
MESSAGE_RULES: tuple[MessageRule, ...] = (
    MessageRule(ev.Setup, _SRC, same(S.SETUP), same(S.SETUP)),
    MessageRule(ev.SetupAck, _DST, to(S.ACTIVE, S.SETUP), to(S.ACTIVE, S.SETUP)),
    # Precopy pages, final pages, postcopy pushes and answers.  The destination also
    # accepts them in READY (a BULK or URGENT frame sent after Commit can overtake the
    # Commit on MAIN), in the paused states (a BULK thread finishing its frame) and in
    # COMPLETED (crossed CompleteAck): a page is installed only if still missing.
    *(
        MessageRule(
            t,
            _SRC,
            same(S.ACTIVE, S.SWITCHOVER, S.POSTCOPY_ACTIVE, S.COMPLETED),
            same(
                S.ACTIVE,
                S.SWITCHOVER,
                S.READY,
                S.POSTCOPY_ACTIVE,
                S.POSTCOPY_PAUSED,
                S.POSTCOPY_RECOVER,
                S.COMPLETED,
            ),
        )
        for t in (ev.Pages, ev.ZeroPages)
    ),
    *(
        MessageRule(t, _SRC, same(S.ACTIVE, S.SWITCHOVER), same(S.ACTIVE, S.SWITCHOVER))
        for t in (ev.Discard, ev.DiscardBitmap)
    ),
    MessageRule(ev.PrecopyRoundEnd, _SRC, same(S.ACTIVE), same(S.ACTIVE)),
    # The ack crosses Switchover and VmState; a source that gave up ignores it.
    MessageRule(
        ev.PrecopyRoundAck,
        _DST,
        same(S.ACTIVE),
        same(S.ACTIVE, S.SWITCHOVER, S.DEVICE, *_ENDED),
    ),
    MessageRule(ev.Switchover, _SRC, to(S.SWITCHOVER, S.ACTIVE), to(S.SWITCHOVER, S.ACTIVE)),
    MessageRule(ev.VmState, _SRC, to(S.DEVICE, S.SWITCHOVER), to(S.DEVICE, S.SWITCHOVER)),
    # Ready again on a resumed MAIN (the destination still waits); a source that is
    # recovering stays there and answers Commit, one that gave up answers Cancel.
    MessageRule(
        ev.Ready,
        _DST,
        {S.DEVICE: S.READY, S.READY: S.READY},
        {S.DEVICE: S.READY, S.POSTCOPY_RECOVER: S.POSTCOPY_RECOVER, **same(*_ENDED)},
    ),
    MessageRule(
        ev.Commit,
        _SRC,
        to(S.POSTCOPY_ACTIVE, S.READY, S.POSTCOPY_RECOVER),
        to(S.POSTCOPY_ACTIVE, S.READY),
    ),
    # Informational: the source may have completed already when it arrives.
    MessageRule(ev.Running, _DST, same(S.POSTCOPY_ACTIVE), same(S.POSTCOPY_ACTIVE, S.COMPLETED)),
    # A request crossing Complete on another connection arrives in COMPLETED.
    MessageRule(
        ev.PageRequest, _DST, same(S.POSTCOPY_ACTIVE), same(S.POSTCOPY_ACTIVE, S.COMPLETED)
    ),
    MessageRule(ev.AllSent, _SRC, same(S.POSTCOPY_ACTIVE), same(S.POSTCOPY_ACTIVE, S.COMPLETED)),
    # Every page is installed: the destination needs nothing more of the source and is
    # done once it says so.  A source that missed it (the link broke) reconnects and is
    # told again on the resumed MAIN.  CompleteAck is a courtesy.
    MessageRule(
        ev.Complete,
        _DST,
        to(S.COMPLETED, S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER, S.COMPLETED),
        to(S.COMPLETED, S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER, S.COMPLETED),
    ),
    MessageRule(ev.CompleteAck, _SRC, same(S.COMPLETED), same(S.COMPLETED)),
    # Cancel until the commit; a source that gave up (FAILED) withdraws a destination
    # left in READY with it on a resumed MAIN.
    MessageRule(
        ev.Cancel,
        _SRC,
        {**to(S.CANCELLED, *BEFORE_COMMIT), **same(*_ENDED)},
        {**to(S.CANCELLED, *BEFORE_COMMIT), **same(*_ENDED)},
    ),
    MessageRule(
        ev.ReceivedBitmap,
        _DST,
        to(S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER),
        to(S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER),
    ),
    MessageRule(ev.Progress, _SRC, same(*_ANY), same(*_ANY)),
    MessageRule(ev.Progress, _DST, same(*_ANY), same(*_ANY)),
)

#: Error, per role, sent or received on an open connection (an Error that refuses a
#: Hello only ends that connection: :class:`~migrated.protocol.session.Session`).
ERROR_RULES: dict[Role, Moves] = {
    _SRC: {
        **to(S.FAILED, *BEFORE_COMMIT),
        **to(S.POSTCOPY_PAUSED, S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED),
        **same(S.COMPLETED, *_ENDED),
    },
    _DST: {
        **to(S.FAILED, S.SETUP, S.ACTIVE, S.SWITCHOVER, S.DEVICE),
        S.READY: S.READY,  # in doubt: never discard a state the source may have committed
        **to(S.POSTCOPY_PAUSED, S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED),
        **same(S.COMPLETED, *_ENDED),
    },
}

#: Local events per role.
LOCAL_RULES: dict[tuple[Role, type], Moves] = {
    (_SRC, ev.LinkLost): ERROR_RULES[_SRC],
    (_DST, ev.LinkLost): ERROR_RULES[_DST],
    (_SRC, ev.BeginRecovery): to(S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED),
    (_DST, ev.BeginRecovery): to(S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED),
    (_SRC, ev.Abandon): to(S.FAILED, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER),
    (_DST, ev.Abandon): to(S.FAILED, S.READY, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER),
}


@dataclass(frozen=True)
class Opening:
    """A kind of connection (channel, resume) and the states in which the source may
    open it and the destination accepts it."""

    sender: tuple[MigrationState, ...]
    receiver: tuple[MigrationState, ...]


_M, _U, _B = ChannelRole.MAIN, ChannelRole.URGENT, ChannelRole.BULK

#: (channel, resume) -> where it may be opened.  A fresh MAIN opens the session; a
#: resumed MAIN recovers it (or, from a source that gave up, withdraws it); URGENT and
#: BULK may overtake the message that made the source open them.
OPENING: dict[tuple[ChannelRole, bool], Opening] = {
    (_M, False): Opening((S.SETUP,), (S.SETUP,)),
    (_U, False): Opening(
        (S.ACTIVE, S.SWITCHOVER, S.DEVICE, S.READY, S.POSTCOPY_ACTIVE),
        (S.ACTIVE, S.SWITCHOVER, S.DEVICE, S.READY, S.POSTCOPY_ACTIVE),
    ),
    (_B, False): Opening((S.POSTCOPY_ACTIVE,), (S.READY, S.POSTCOPY_ACTIVE)),
    (_M, True): Opening(
        (S.POSTCOPY_RECOVER, *_ENDED),
        (S.READY, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER, S.COMPLETED),
    ),
    (_U, True): Opening((S.POSTCOPY_ACTIVE,), (S.READY, S.POSTCOPY_ACTIVE)),
    (_B, True): Opening((S.POSTCOPY_ACTIVE,), (S.READY, S.POSTCOPY_ACTIVE)),
}

#: Before the commit, page frames travel on MAIN only: they must stay ordered with the
#: Discards that invalidate them and with VmState.  Afterwards any channel carries them.
PAGE_FRAMES = (ev.Pages, ev.ZeroPages)


def page_channel_allowed(state: MigrationState, channel: ChannelRole) -> bool:
    """Whether a page frame may travel on ``channel`` when its sender is in ``state``
    (the receiver checks against its own state, which is at least as far)."""
    return channel is ChannelRole.MAIN or state not in (S.ACTIVE, S.SWITCHOVER)


SESSION_EVENT_TYPES: tuple[type, ...] = (
    tuple(t for t in ev.WIRE_EVENT_TYPES if t not in (ev.Hello, ev.Welcome)) + ev.LOCAL_EVENT_TYPES
)

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
    if t is ev.Cancel and state not in BEFORE_COMMIT:
        return Refusal(
            ev.ErrorCode.CANCEL_REFUSED,
            f"Cancel refused in state {state.value}: the source has committed the VM to "
            "the destination; postcopy cannot be cancelled",
        )
    verb = "send" if direction is Direction.SENT else "receive"
    return Refusal(
        ev.ErrorCode.UNEXPECTED,
        f"the {role.value} may not {verb} {name} in state {state.value}",
    )


def _put(key: TableKey, target: MigrationState) -> None:
    if key in TABLE:
        raise RuntimeError(f"duplicate transition rule {key}")
    TABLE[key] = target


def _build() -> None:
    for rule in MESSAGE_RULES:
        for state, target in rule.sent.items():
            _put((rule.sender, state, _SENT, rule.message), target)
        for state, target in rule.received.items():
            _put((rule.sender.peer, state, _RECV, rule.message), target)
    for role, moves in ERROR_RULES.items():
        for direction in (_SENT, _RECV):
            for state, target in moves.items():
                _put((role, state, direction, ev.Error), target)
    for (role, t), moves in LOCAL_RULES.items():
        for state, target in moves.items():
            _put((role, state, _LOCAL, t), target)
    for role in Role:
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

    Threads: one thread (the event loop) makes every transition.  A push or receive
    thread may feed it page events concurrently: those never change the state, and
    :meth:`handle` writes nothing when the state stays, so a thread cannot overwrite a
    transition the loop just made.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = MigrationState.SETUP
        #: The last state before the session failed, was cancelled or paused: the
        #: phase a failure happened in, for messages.
        self.before_end = MigrationState.SETUP
        self._crossed = False

    @property
    def point_of_no_return(self) -> bool:
        """True once the source sent Commit / the destination received it.  Sticky."""
        return self._crossed

    def check(self, event: Any, direction: Direction) -> MigrationState:
        """The state ``event`` would lead to; raises like :meth:`handle`, changes nothing."""
        entry = TABLE.get((self.role, self.state, direction, type(event)))
        if entry is None:
            entry = Refusal(ev.ErrorCode.PROTOCOL, f"{type(event).__name__} is not an event")
        if isinstance(entry, Refusal):
            if direction is Direction.RECEIVED:
                raise RemoteProtocolError(entry.reason, code=entry.code)
            raise LocalProtocolError(entry.reason, code=entry.code)
        return entry

    def handle(self, event: Any, direction: Direction) -> MigrationState:
        """Apply one event; returns the new state."""
        entry = self.check(event, direction)
        if entry is not self.state:
            if entry in _STOPS and self.state not in _STOPS:
                self.before_end = self.state
            self.state = entry
        if type(event) is ev.Commit:
            self._crossed = True
        return entry

    def link_lost(self) -> MigrationState:
        """A channel failed: see :data:`ERROR_RULES`."""
        return self.handle(ev.LinkLost(), Direction.LOCAL)

    def begin_recovery(self) -> MigrationState:
        """Start the recovery handshake: POSTCOPY_PAUSED → POSTCOPY_RECOVER."""
        return self.handle(ev.BeginRecovery(), Direction.LOCAL)

    def abandon(self) -> MigrationState:
        """The operator gives up an in-doubt or paused session: → FAILED (a crossed
        point of no return stays crossed)."""
        return self.handle(ev.Abandon(), Direction.LOCAL)

    def may_open(self, channel: ChannelRole, resume: bool, direction: Direction) -> bool:
        """Whether a connection of this kind may be opened (SENT: by us, the source) or
        accepted (RECEIVED: by us, the destination) now."""
        opening = OPENING[(channel, resume)]
        states = opening.sender if direction is Direction.SENT else opening.receiver
        # A source that gave up may withdraw a waiting destination (a resumed MAIN in
        # FAILED or CANCELLED), but one that had committed only recovers.
        if self._crossed and self.state in _ENDED:
            return False
        return self.state in states

    def __repr__(self) -> str:
        return (
            f"SessionState(role={self.role.value}, state={self.state.value}, "
            f"point_of_no_return={self._crossed})"
        )
