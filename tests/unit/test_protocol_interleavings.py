"""Every interleaving of two peers that follow the session table, explored exhaustively.

A small model of a migration: a source and a destination, each with the real
:class:`SessionState`, talking over MAIN, URGENT and BULK — three FIFO streams with no
order between them.  A side may send any message its table allows on any channel its
routes allow, once the channel is open (Hello / Welcome, with the OPENING rules); the
link may be cut once (every stream emptied, each side noticing on its own time); the
source may then recover (resumed MAIN).  Breadth-first search over every reachable
configuration checks:

* **completeness**: whatever arrives, in whatever order the streams deliver it, the
  receiver's table accepts it (a refusal would pause or fail a healthy migration — as
  a PageRequest overtaking Running on MAIN once did);
* **never lose the VM**: once the source has committed, the destination never drops
  the state (FAILED or CANCELLED), and the destination never runs the guest unless the
  source has committed (so at most one copy runs).
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, replace

import pytest

from migrated.protocol import events as ev
from migrated.protocol.events import ChannelRole, Role
from migrated.protocol.rules import ROUTES
from migrated.protocol.state import (
    TABLE,
    Direction,
    MigrationState,
    Refusal,
    SessionState,
    page_channel_allowed,
)

S = MigrationState
SRC, DST = Role.SOURCE, Role.DESTINATION
CHANNELS = (ChannelRole.MAIN, ChannelRole.URGENT, ChannelRole.BULK)
LAYOUT = None

# The messages each side may try, as types (payloads do not matter to the table).
MESSAGES = {
    SRC: (
        ev.Setup,
        ev.Pages,
        ev.Discard,
        ev.PrecopyRoundEnd,
        ev.Switchover,
        ev.VmState,
        ev.Commit,
        ev.AllSent,
        ev.CompleteAck,
        ev.Cancel,
        ev.Error,
    ),
    DST: (
        ev.SetupAck,
        ev.PrecopyRoundAck,
        ev.Ready,
        ev.Running,
        ev.PageRequest,
        ev.Complete,
        ev.ReceivedBitmap,
        ev.Error,
    ),
}
# How often each (role, type) may be sent in one run (bounds the search).
# Commit and Ready twice: once, and again on a resumed MAIN.
MAX_SENDS = {ev.Cancel: 2, ev.Commit: 2, ev.Ready: 2, ev.Complete: 2}
DEFAULT_MAX_SENDS = 1
# Replies: sent only once their trigger has arrived (the table cannot tell, both
# happen in one state).
REPLIES = {ev.SetupAck: ev.Setup, ev.PrecopyRoundAck: ev.PrecopyRoundEnd, ev.Commit: ev.Ready}
# After sending one of these the sender closes every connection: it reads nothing
# more, while what it wrote is still delivered (TCP flushes before the FIN).
CLOSING = (ev.Error, ev.Cancel)


@dataclass(frozen=True)
class Side:
    state: MigrationState
    crossed: bool = False
    before_end: MigrationState = S.SETUP
    noticed: bool = True  # has applied LinkLost for the last cut


@dataclass(frozen=True)
class World:
    src: Side
    dst: Side
    # per channel: "closed" | "hello" (Hello in flight) | "open" (accepted)
    chan: tuple[str, ...]
    resume: tuple[bool, ...]
    to_dst: tuple[tuple[type, ...], ...]
    to_src: tuple[tuple[type, ...], ...]
    sent: tuple[tuple[str, int], ...]  # sorted (role:type, times sent)
    got: tuple[str, ...] = ()  # sorted role:type received (for replies)
    cuts: int = 0


def table_state(side: Side, role: Role) -> SessionState:
    st = SessionState(role)
    st.state, st.before_end = side.state, side.before_end
    st._crossed = side.crossed
    return st


def apply(side: Side, role: Role, t: type, direction: Direction) -> Side | Refusal:
    entry = TABLE[(role, side.state, direction, t)]
    if isinstance(entry, Refusal):
        return entry
    crossed = side.crossed or t is ev.Commit
    return replace(side, state=entry, crossed=crossed)


def count(w: World, role: Role, t: type) -> int:
    return dict(w.sent).get(f"{role.value}:{t.__name__}", 0)


def bump(w: World, role: Role, t: type) -> tuple[tuple[str, int], ...]:
    sent = dict(w.sent)
    key = f"{role.value}:{t.__name__}"
    sent[key] = sent.get(key, 0) + 1
    return tuple(sorted(sent.items()))


def set_at(items: tuple, i: int, value: object) -> tuple:
    return (*items[:i], value, *items[i + 1 :])


@dataclass(frozen=True)
class Faults:
    """Which failures a run may contain (explored separately to keep each search small).
    With failures, the precopy messages are left out: their rules do not differ from
    Pages' and they multiply the interleavings without reaching new states."""

    errors: bool
    cut: bool

    def allows(self, t: type) -> bool:
        if t is ev.Error:
            return self.errors
        if self.errors or self.cut:
            return t not in (ev.Discard, ev.PrecopyRoundEnd, ev.PrecopyRoundAck)
        return True


def successors(w: World, problems: list[str], faults: Faults) -> list[World]:
    out: list[World] = []
    sides = {SRC: w.src, DST: w.dst}
    # 1. the source opens a channel (fresh, or resumed MAIN after a cut)
    for i, ch in enumerate(CHANNELS):
        if not w.src.noticed:
            break  # a side reconnects only after it has dealt with the loss
        if w.chan[i] != "closed" or w.to_dst[i] or w.to_src[i]:
            continue  # a new connection once the old one's bytes are delivered or gone
        for resume in (False, True):
            if not resume and ch is ChannelRole.MAIN and w.sent:
                continue  # the session's first connection only
            if resume and ch is ChannelRole.MAIN and w.src.state is S.POSTCOPY_ACTIVE:
                continue
            if not table_state(w.src, SRC).may_open(ch, resume, Direction.SENT):
                continue
            if ch is not ChannelRole.MAIN and w.chan[0] != "open":
                continue
            opened = f"source:Hello-{ch.name}"
            if dict(w.sent).get(opened, 0) >= 2:
                continue  # once fresh, once resumed: enough to reach every state
            sent = dict(w.sent)
            sent[opened] = sent.get(opened, 0) + 1
            out.append(
                replace(
                    w,
                    chan=set_at(w.chan, i, "hello"),
                    resume=set_at(w.resume, i, resume),
                    sent=tuple(sorted(sent.items())),
                )
            )
    # 2. the destination receives a Hello (the engine's pre-steps for a resumed MAIN)
    for i, ch in enumerate(CHANNELS):
        if w.chan[i] != "hello" or not w.dst.noticed:
            continue
        dst = w.dst
        if ch is ChannelRole.MAIN and w.resume[i]:
            if dst.state in (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER):
                dst = apply(dst, DST, ev.LinkLost, Direction.LOCAL)  # type: ignore[assignment]
            if dst.state is S.POSTCOPY_PAUSED:
                dst = apply(dst, DST, ev.BeginRecovery, Direction.LOCAL)  # type: ignore[assignment]
        if not table_state(dst, DST).may_open(ch, w.resume[i], Direction.RECEIVED):
            # A refused Hello is legitimate only where the destination holds nothing.
            if dst.state not in (S.SETUP, S.FAILED, S.CANCELLED, S.COMPLETED):
                problems.append(f"destination refused {ch.name} Hello in {dst.state.value}: {w}")
            # The source sees its connection refused: link loss for its session, and
            # the engine closes every connection before it recovers.
            if ch is ChannelRole.BULK:
                out.append(replace(w, chan=set_at(w.chan, i, "closed")))
            else:
                lost = cut(w)
                out.append(replace(lost, dst=w.dst, cuts=w.cuts))
            continue
        # The Welcome is the first frame back on the new connection; the source acts on
        # nothing of it before, so its arrival is folded into the acceptance.
        out.append(replace(w, dst=dst, chan=set_at(w.chan, i, "open")))
    # 4. a side sends a message its table allows, on a channel its routes allow
    for role in (SRC, DST):
        side = sides[role]
        if not side.noticed:
            continue
        for t in MESSAGES[role]:
            if count(w, role, t) >= MAX_SENDS.get(t, DEFAULT_MAX_SENDS):
                continue
            if not faults.allows(t):
                continue
            again = (ev.Ready, S.READY), (ev.Complete, S.COMPLETED)
            if (t, side.state) in again and not w.resume[0]:
                continue  # Ready or Complete again only answers a resumed MAIN
            trigger = REPLIES.get(t)
            if trigger is not None and f"{role.value}:{trigger.__name__}" not in w.got:
                continue
            new = apply(side, role, t, Direction.SENT)
            if isinstance(new, Refusal):
                continue
            for i, ch in enumerate(CHANNELS):
                if w.chan[i] != "open" or ch not in ROUTES[t][1]:
                    continue
                if t is ev.Error and ch is not ChannelRole.MAIN:
                    continue
                if t is ev.PageRequest and ch is ChannelRole.MAIN:
                    continue  # the reference destination asks on URGENT
                if t is ev.Pages and not page_channel_allowed(side.state, ch):
                    continue
                if role is SRC:
                    nxt = replace(w, src=new, to_dst=set_at(w.to_dst, i, (*w.to_dst[i], t)))
                else:
                    nxt = replace(w, dst=new, to_src=set_at(w.to_src, i, (*w.to_src[i], t)))
                nxt = replace(nxt, sent=bump(w, role, t))
                if t in CLOSING:
                    nxt = hang_up(nxt, role)
                out.append(nxt)
    # 5. a side receives the head of a stream
    for role in (SRC, DST):
        queues = w.to_src if role is SRC else w.to_dst
        for i, _ch in enumerate(CHANNELS):
            if not queues[i] or not sides[role].noticed:
                continue
            t = queues[i][0]
            new = apply(sides[role], role, t, Direction.RECEIVED)
            if isinstance(new, Refusal):
                problems.append(
                    f"{role.value} refused {t.__name__} in {sides[role].state.value}: "
                    f"{new.reason}\n  world: {w}"
                )
                continue
            rest = set_at(queues, i, queues[i][1:])
            nxt = (
                replace(w, src=new, to_src=rest)
                if role is SRC
                else replace(w, dst=new, to_dst=rest)
            )
            nxt = replace(nxt, got=tuple(sorted({*w.got, f"{role.value}:{t.__name__}"})))
            if t in CLOSING:  # the engine closes every connection on an Error or Cancel
                nxt = hang_up(nxt, role)
            out.append(nxt)
    # 6. the link is cut (once), and each side notices on its own time
    if faults.cut and w.cuts == 0 and w.chan[0] != "closed":
        out.append(cut(w))
    for role in (SRC, DST):
        side = sides[role]
        if not side.noticed:
            new = apply(side, role, ev.LinkLost, Direction.LOCAL)
            assert not isinstance(new, Refusal), (role, side)
            new = replace(new, noticed=True)
            out.append(replace(w, src=new) if role is SRC else replace(w, dst=new))
    # 7. recovery: the source starts it once it noticed
    if w.src.state is S.POSTCOPY_PAUSED and w.src.noticed:
        new = apply(w.src, SRC, ev.BeginRecovery, Direction.LOCAL)
        assert not isinstance(new, Refusal)
        out.append(replace(w, src=new))
    return out


def forget_ready(w: World) -> tuple[str, ...]:
    # Commit answers the Ready of the current MAIN connection, not an older one's.
    return tuple(g for g in w.got if g != "source:Ready")


def hang_up(w: World, role: Role) -> World:
    """``role`` closes its connections: it reads nothing more; what it sent before is
    still delivered.  The channels count as closed (reopening is a new connection)."""
    if role is SRC:
        return replace(w, chan=("closed",) * 3, to_src=((), (), ()), got=forget_ready(w))
    return replace(w, chan=("closed",) * 3, to_dst=((), (), ()), got=forget_ready(w))


def cut(w: World) -> World:
    empty = ((), (), ())
    return replace(
        w,
        chan=("closed",) * 3,
        to_dst=empty,
        to_src=empty,
        src=replace(w.src, noticed=False),
        dst=replace(w.dst, noticed=False),
        got=forget_ready(w),
        cuts=w.cuts + 1,
    )


def check_safety(w: World, problems: list[str]) -> None:
    if w.src.crossed and w.dst.state in (S.FAILED, S.CANCELLED):
        problems.append(f"VM lost: the source committed, the destination dropped it: {w}")
    if w.dst.crossed and not w.src.crossed:
        problems.append(f"two copies: the destination runs the guest uncommitted: {w}")


DEAD_ENDS: list[World] = []


def explore(
    faults: Faults, limit: int | None = None
) -> tuple[int, list[str], set[tuple[MigrationState, MigrationState]]]:
    """Breadth-first over every reachable world (the first ``limit`` ones, if given:
    then every interleaving up to the depth reached is covered)."""
    start = World(
        src=Side(S.SETUP),
        dst=Side(S.SETUP),
        chan=("closed",) * 3,
        resume=(False,) * 3,
        to_dst=((), (), ()),
        to_src=((), (), ()),
        sent=(),
    )
    seen = {start}
    todo = deque([start])
    problems: list[str] = []
    ends: set[tuple[MigrationState, MigrationState]] = set()
    while todo and len(problems) < 5 and (limit is None or len(seen) < limit):
        w = todo.popleft()
        check_safety(w, problems)
        nxt = successors(w, problems, faults)
        if not nxt:
            ends.add((w.src.state, w.dst.state))
            DEAD_ENDS.append(w)
        for n in nxt:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return len(seen), problems, ends


@pytest.mark.parametrize(
    "faults",
    [
        Faults(errors=False, cut=False),
        Faults(errors=False, cut=True),
        Faults(errors=True, cut=False),
    ],
    ids=["healthy", "link-cut-and-recovery", "error-frames"],
)
def test_every_interleaving_is_accepted_and_never_loses_the_vm(faults: Faults) -> None:
    # The healthy model is explored completely (~100k worlds).  With failures it has
    # 0.5M-0.8M worlds (~2 minutes): CI covers the first 100k (every interleaving up to
    # that depth); MIGRATED_FULL_MODEL=1 explores them all.
    full = os.environ.get("MIGRATED_FULL_MODEL") == "1"
    limit = None if full or not (faults.cut or faults.errors) else 100_000
    nworlds, problems, ends = explore(faults, limit)
    assert not problems, "\n".join(problems[:5])
    assert nworlds > 1000  # the model really explores
    if limit is None:
        assert (S.COMPLETED, S.COMPLETED) in ends
    if faults.cut or faults.errors:
        # Both sides can end safely without the migration: the VM stayed on the source.
        assert any(
            not dst.value.startswith("postcopy") and src in (S.FAILED, S.CANCELLED)
            for src, dst in ends
        )
