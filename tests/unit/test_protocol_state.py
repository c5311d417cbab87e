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


def test_terminal_states_only_accept_errors_and_link_loss() -> None:
    for (_role, state, _direction, t), entry in TABLE.items():
        if state in (MigrationState.FAILED, MigrationState.CANCELLED) and not isinstance(
            entry, Refusal
        ):
            assert t in (ev.Error, ev.LinkLost)
            assert entry is state


def test_point_of_no_return_is_never_left_for_a_safe_state() -> None:
    """Past the point of no return, no transition leads back to a pre-run state or to
    CANCELLED; FAILED only through Abandon."""
    after = {s for s in MigrationState if s.after_point_of_no_return}
    for (_role, state, _direction, t), entry in TABLE.items():
        if state in after and isinstance(entry, MigrationState):
            assert entry in after or (entry is MigrationState.FAILED and t is ev.Abandon)


def test_only_running_crosses_for_the_destination() -> None:
    for (role, state, direction, t), entry in TABLE.items():
        if (
            role is Role.DESTINATION
            and isinstance(entry, MigrationState)
            and entry.after_point_of_no_return
            and not state.after_point_of_no_return
        ):
            assert (state, direction, t) == (MigrationState.DEVICE, Direction.SENT, ev.Running)


EVENT_SAMPLES = [
    ev.Hello(1, 1, ChannelRole.MAIN, b"x" * 16, frozenset(), False),
    ev.Hello(1, 1, ChannelRole.MAIN, b"x" * 16, frozenset(), True),
    *[t() for t in (ev.SetupAck, ev.Switchover, ev.Running, ev.AllSent, ev.CompleteAck)],
    ev.Welcome(1, frozenset(), b"x" * 16),
    ev.Error("x", "y"),
    ev.Setup("vm", "u", None, 1, "postcopy"),  # type: ignore[arg-type]
    ev.Pages(0, 1, None),
    ev.ZeroPages(0, 1),
    ev.Discard(0, 1),
    ev.DiscardBitmap(None),
    ev.PrecopyRoundEnd(1, 1),
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
        st.tuples(
            st.sampled_from(EVENT_SAMPLES),
            st.sampled_from(list(Direction)),
            st.sampled_from(list(ChannelRole)),
        ),
        max_size=40,
    ),
)
def test_random_event_sequences(
    role: Role, steps: list[tuple[object, Direction, ChannelRole]]
) -> None:
    """Any sequence: each step either transitions or raises a ProtocolError with the
    state unchanged; the point of no return never un-crosses."""
    session = SessionState(role)
    crossed = False
    for event, direction, channel in steps:
        before = session.state
        if type(event) in ev.LOCAL_EVENT_TYPES:
            direction = Direction.LOCAL
        elif direction is Direction.LOCAL:
            direction = Direction.SENT
        try:
            after = session.handle(event, direction, channel=channel)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            assert session.state is before
            assert isinstance(exc, RemoteProtocolError) == (direction is Direction.RECEIVED)
            continue
        assert after is session.state
        crossed = crossed or after.after_point_of_no_return
        assert session.point_of_no_return == crossed
        if before.terminal:
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


def test_package_files_exist() -> None:
    assert len(list(PACKAGE.glob("*.py"))) >= 5
