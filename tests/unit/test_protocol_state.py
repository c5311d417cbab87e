"""The session tables are total, and the package stays sans-IO."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrated.errors import LocalProtocolError, RemoteProtocolError
from migrated.protocol import (
    TABLE,
    ChannelRole,
    Direction,
    MigrationState,
    Refusal,
    Role,
    SessionState,
)
from migrated.protocol import events as ev
from migrated.protocol.state import BEFORE_COMMIT as BEFORE
from migrated.protocol.state import SENDERS, SESSION_EVENT_TYPES

PACKAGE = Path(__file__).resolve().parents[2] / "migrated" / "protocol"
FORBIDDEN = {"asyncio", "socket", "os", "time", "threading", "select", "subprocess", "signal"}
ALLOWED = {
    "__future__",
    "collections",
    "dataclasses",
    "enum",
    "msgpack",
    "struct",
    "typing",
    "xxhash",
    "zlib",
    "migrated",
}


def test_table_is_total() -> None:
    for role in Role:
        for state in MigrationState:
            for direction in Direction:
                for t in SESSION_EVENT_TYPES:
                    entry = TABLE[(role, state, direction, t)]
                    assert isinstance(entry, (MigrationState, Refusal))
    assert len(TABLE) == 2 * len(MigrationState) * len(Direction) * len(SESSION_EVENT_TYPES)


def test_table_respects_senders() -> None:
    for (role, _state, direction, t), entry in TABLE.items():
        if direction is Direction.LOCAL:
            if t not in ev.LOCAL_EVENT_TYPES:
                assert isinstance(entry, Refusal)
            continue
        if t not in SENDERS:
            assert isinstance(entry, Refusal)
            continue
        sender = role if direction is Direction.SENT else role.peer
        if sender not in SENDERS[t]:
            assert isinstance(entry, Refusal), (role, direction, t)


AFTER_COMMIT = {
    MigrationState.POSTCOPY_ACTIVE,
    MigrationState.POSTCOPY_PAUSED,
    MigrationState.POSTCOPY_RECOVER,
    MigrationState.COMPLETED,
}
BEFORE_COMMIT = set(BEFORE)


def test_ended_sessions_never_move() -> None:
    for (_role, now, _direction, _t), entry in TABLE.items():
        if now in (MigrationState.FAILED, MigrationState.CANCELLED) and not isinstance(
            entry, Refusal
        ):
            assert entry is now


def test_after_the_commit_nothing_leads_back() -> None:
    """Past the commit, no transition leads to a pre-commit state or CANCELLED; FAILED
    only through the operator's Abandon."""
    for (_role, now, _direction, t), entry in TABLE.items():
        if now in AFTER_COMMIT and isinstance(entry, MigrationState):
            assert entry in AFTER_COMMIT or (entry is MigrationState.FAILED and t is ev.Abandon)


def test_only_commit_crosses() -> None:
    """The postcopy states are entered from before the commit only by Commit: sent by
    the source (from READY), received by the destination (in READY)."""
    for (role, now, direction, t), entry in TABLE.items():
        if isinstance(entry, MigrationState) and entry in AFTER_COMMIT and now in BEFORE_COMMIT:
            assert t is ev.Commit and now is MigrationState.READY, (role, now, direction, t)
            expected = Direction.SENT if role is Role.SOURCE else Direction.RECEIVED
            assert direction is expected


def test_a_destination_in_doubt_keeps_the_state() -> None:
    """READY on the destination ends only by Commit, Cancel or the operator: no Error and
    no link loss makes it drop a state the source may have committed."""
    for (role, now, direction, t), entry in TABLE.items():
        if role is Role.DESTINATION and now is MigrationState.READY and entry is not now:
            if isinstance(entry, Refusal):
                continue
            assert (t, direction) in (
                (ev.Commit, Direction.RECEIVED),
                (ev.Cancel, Direction.RECEIVED),
                (ev.Abandon, Direction.LOCAL),
            ), (t, direction, entry)


def test_a_source_before_the_commit_always_fails_safely() -> None:
    for (role, now, direction, t), entry in TABLE.items():
        if (
            role is Role.SOURCE
            and now in BEFORE_COMMIT
            and (t, direction)
            in (
                (ev.Error, Direction.SENT),
                (ev.Error, Direction.RECEIVED),
                (ev.LinkLost, Direction.LOCAL),
            )
        ):
            assert entry is MigrationState.FAILED


EVENT_SAMPLES = [
    ev.Hello(2, 2, ChannelRole.MAIN, b"x" * 16, frozenset(), False),
    *[
        t()
        for t in (
            ev.SetupAck,
            ev.Switchover,
            ev.Ready,
            ev.Commit,
            ev.Running,
            ev.AllSent,
            ev.CompleteAck,
        )
    ],
    ev.Error("x", "y"),
    ev.Setup("vm", "u", None, 1, "postcopy"),  # type: ignore[arg-type]
    ev.Pages(0, 1, None),
    ev.ZeroPages(0, 1),
    ev.Discard(0, 1),
    ev.DiscardBitmap(None),
    ev.PrecopyRoundEnd(1, 1),
    ev.PrecopyRoundAck(1, 1),
    ev.VmState(None),
    ev.PageRequest(1, 0, 1),
    ev.Progress(0, 0),
    ev.Complete(1),
    ev.Cancel("x"),
    ev.ReceivedBitmap(None),
    ev.LinkLost(),
    ev.BeginRecovery(),
    ev.Abandon(),
]


@settings(max_examples=300, deadline=None)
@given(
    role=st.sampled_from(list(Role)),
    steps=st.lists(
        st.tuples(st.sampled_from(EVENT_SAMPLES), st.sampled_from(list(Direction))),
        max_size=40,
    ),
)
def test_random_event_sequences(role: Role, steps: list[tuple[object, Direction]]) -> None:
    """Any sequence: each step either transitions or raises a ProtocolError with the
    state unchanged; the point of no return is crossed by Commit and never un-crossed."""
    session = SessionState(role)
    crossed = False
    for event, direction in steps:
        before = session.state
        if type(event) in ev.LOCAL_EVENT_TYPES:
            direction = Direction.LOCAL
        elif direction is Direction.LOCAL:
            direction = Direction.SENT
        try:
            after = session.handle(event, direction)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            assert session.state is before
            assert isinstance(exc, RemoteProtocolError) == (direction is Direction.RECEIVED)
            continue
        assert after is session.state
        crossed = crossed or type(event) is ev.Commit
        assert session.point_of_no_return == crossed
        if before in (MigrationState.FAILED, MigrationState.CANCELLED):
            assert after is before


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.add("migrated.protocol")  # relative import stays in the package
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.add("<dynamic __import__>")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_protocol_package_is_sans_io(path: Path) -> None:
    for module in _imports(path):
        top = module.split(".")[0]
        assert top not in FORBIDDEN, f"{path.name} imports {module}"
        assert top in ALLOWED, f"{path.name} imports {module}, not on the allow list"
        if top == "migrated":
            assert module == "migrated.errors" or module.startswith("migrated.protocol"), (
                f"{path.name} imports {module}: only migrated.errors and the package itself"
            )


def test_every_module_is_named_in_the_package_map() -> None:
    """The package docstring is the map of the protocol: it names every module."""
    doc = (PACKAGE / "__init__.py").read_text().split('"""')[1]
    for path in PACKAGE.glob("*.py"):
        if path.name != "__init__.py":
            assert f":mod:`.{path.stem}`" in doc, f"{path.name} missing from the package map"
