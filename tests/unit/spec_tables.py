"""Render the session tables of migrated.protocol.state as the Markdown tables of
docs/protocol.md §6 (the spec test compares the two, so they cannot drift)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from migrated.protocol import events as ev
from migrated.protocol.events import Role
from migrated.protocol.state import (
    ERROR_RULES,
    LOCAL_RULES,
    MESSAGE_RULES,
    OPENING,
    MigrationState,
    Moves,
)

ORDER = list(MigrationState)


def moves(m: Moves) -> str:
    if set(m) == set(ORDER) and all(m[s] is s for s in m):
        return "any state"
    parts = []
    for state in sorted(m, key=ORDER.index):
        target = m[state]
        parts.append(state.value if target is state else f"{state.value} → {target.value}")
    return ", ".join(parts)


def message_table() -> str:
    lines = [
        "| message | sent by | the sender, in → after sending "
        "| the receiver, in → after receiving |",
        "|---|---|---|---|",
    ]
    for rule in MESSAGE_RULES:
        lines.append(
            f"| {rule.message.__name__} | {rule.sender.value} | {moves(rule.sent)} | "
            f"{moves(rule.received)} |"
        )
    return "\n".join(lines)


def local_table() -> str:
    lines = [
        "| event | source, in → after | destination, in → after |",
        "|---|---|---|",
        f"| Error (sent or received on an open connection) | {moves(ERROR_RULES[Role.SOURCE])} "
        f"| {moves(ERROR_RULES[Role.DESTINATION])} |",
    ]
    for t in (ev.LinkLost, ev.BeginRecovery, ev.Abandon):
        lines.append(
            f"| {t.__name__} (local) | {moves(LOCAL_RULES[(Role.SOURCE, t)])} | "
            f"{moves(LOCAL_RULES[(Role.DESTINATION, t)])} |"
        )
    return "\n".join(lines)


def opening_table() -> str:
    lines = [
        "| connection | the source opens it in | the destination accepts it in |",
        "|---|---|---|",
    ]
    for (channel, resume), o in OPENING.items():
        kind = f"{channel.name}, resume={'true' if resume else 'false'}"
        sender = ", ".join(s.value for s in o.sender)
        receiver = ", ".join(s.value for s in o.receiver)
        lines.append(f"| {kind} | {sender} | {receiver} |")
    return "\n".join(lines)


def all_tables() -> dict[str, str]:
    return {"messages": message_table(), "local": local_table(), "opening": opening_table()}


def blocks_in(text: str) -> dict[str, str]:
    """The tables between ``<!-- table:NAME -->`` markers of a document."""
    return {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"<!-- table:(\w+) -->\n(.*?)<!-- /table:\1 -->", text, re.S)
    }


def rewrite(path: Path) -> None:
    """Put the current tables into the document at ``path``."""
    text = path.read_text()
    for name, table in all_tables().items():
        text = re.sub(
            rf"<!-- table:{name} -->\n.*?<!-- /table:{name} -->",
            lambda _m, name=name, table=table: (
                f"<!-- table:{name} -->\n{table}\n<!-- /table:{name} -->"
            ),
            text,
            flags=re.S,
        )
    path.write_text(text)


if __name__ == "__main__":
    # python tests/unit/spec_tables.py docs/protocol.md: refresh the spec's tables
    rewrite(Path(sys.argv[1]))
