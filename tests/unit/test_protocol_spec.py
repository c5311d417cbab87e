"""docs/protocol.md and the code agree: the spec's tables are the code's tables, and
every message, error code and limit the spec names exists in the code."""

from __future__ import annotations

import re
from pathlib import Path

from migrated.protocol import codec
from migrated.protocol import events as ev

from .spec_tables import all_tables, blocks_in

SPEC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def test_the_state_tables_of_the_spec_are_the_code_s() -> None:
    found = blocks_in(SPEC)
    for name, table in all_tables().items():
        assert found.get(name) == table, (
            f"docs/protocol.md table {name!r} differs from migrated.protocol.state; "
            "refresh it with `python tests/unit/spec_tables.py docs/protocol.md` after "
            "checking that the change is intended"
        )


def test_every_message_is_in_the_message_table() -> None:
    rows = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| (\w+) \|", SPEC, re.M)}
    assert rows == {spec.code: spec.cls.__name__ for spec in codec.MESSAGES}


def test_every_error_code_is_specified() -> None:
    table = SPEC[SPEC.index("## 10. Error codes") : SPEC.index("## 11. Versioning")]
    specified = set(re.findall(r"^\| `([a-z-]+)` \|", table, re.M))
    used = {v for k, v in vars(ev.ErrorCode).items() if k.isupper()}
    assert used == specified


def test_the_version_and_limits_match() -> None:
    assert (
        f"This is version {ev.PROTOCOL_VERSION} (`min_version` {ev.MIN_PROTOCOL_VERSION})" in SPEC
    )
    assert "at most 65536 bytes" in SPEC and ev.MAX_HEADER_NBYTES == 65536
    assert "≤ 64 MiB" in SPEC and ev.MAX_VM_STATE_NBYTES == 64 << 20
    assert "(≤ 512)" in SPEC and ev.MAX_REQUEST_NPAGES == 512
