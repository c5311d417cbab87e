"""Logging helpers shared by every layer: per-migration context and operator events.

Every module logs through ``logging.getLogger(__name__)``.  Records about a migration
carry four attributes, set with :func:`migration_logger` (a ``LoggerAdapter``):

* ``migrated_vm``: the VM's name;
* ``migrated_session``: the migration session id, hex;
* ``migrated_phase``: the session state (QEMU's words: ``active``, ``postcopy-paused``...),
  read at the moment of the record, not when the adapter was made;
* ``migrated_event``: for the five events an operator searches for (see
  :data:`EVENT_MESSAGE_IDS`), the event's name; absent otherwise.

The service layer's handlers turn them into journald fields (``MIGRATED_VM``,
``MIGRATED_SESSION``, ``MIGRATED_PHASE``, ``MESSAGE_ID``) or a plain prefix on stderr.
Nothing here configures handlers: libraries only emit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any

__all__ = ["EVENT_MESSAGE_IDS", "MigrationLogger", "migration_logger"]

#: Stable journald MESSAGE_IDs (128-bit, hex) per operator event.  Never change one:
#: operators search for them (``journalctl MESSAGE_ID=...``).
EVENT_MESSAGE_IDS: dict[str, str] = {
    "switchover": "5b1f1c0e8d6a4f4c9e2b7a3d6c0f1e21",
    "postcopy-paused": "8a3e5d2b1c4f4e6a9b7d0c2e4f6a8b13",
    "recovered": "c2d4e6f8a0b24c4e8f1a3b5c7d9e0f25",
    "completed": "1e3a5c7e9b0d4f2a8c6e4a2c0e8b6d37",
    "failed": "f0e2d4c6b8a04e1c9a7b5d3f1e0c2a49",
}


class MigrationLogger(logging.LoggerAdapter):  # type: ignore[type-arg,unused-ignore]
    """A logger whose records carry the migration context (see the module notes)."""

    def __init__(
        self, logger: logging.Logger, vm: str, session: str, phase: Callable[[], str]
    ) -> None:
        super().__init__(logger, {})
        self.vm, self.session, self._phase = vm, session, phase

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("migrated_vm", self.vm)
        extra.setdefault("migrated_session", self.session)
        extra.setdefault("migrated_phase", self._phase())
        kwargs["extra"] = extra
        return msg, kwargs

    def event(self, name: str, msg: str, *args: Any, level: int = logging.INFO) -> None:
        """Log one of the operator events of :data:`EVENT_MESSAGE_IDS`."""
        if name not in EVENT_MESSAGE_IDS:
            raise ValueError(f"unknown operator event {name!r}")
        self.log(level, msg, *args, extra={"migrated_event": name})


def migration_logger(
    name: str, *, vm: str, session: str, phase: Callable[[], str]
) -> MigrationLogger:
    """``logging.getLogger(name)`` with the migration context on every record."""
    return MigrationLogger(logging.getLogger(name), vm, session, phase)
