"""Fault injection for tests: cut every connection of a migration at one message.

``MIGRATED_FAULT=ACTION:DIRECTION:MESSAGE[:N]`` in the environment of a migrated
process arms one cut for the migrations it runs:

* ACTION ``cut-before`` or ``cut-after``; DIRECTION ``sent`` or ``recv``; MESSAGE a wire
  message class name (``VmState``, ``Ready``, ``Commit``...); N the occurrence, from 1
  (default 1), counted over every connection of the session.
* ``cut-before:sent``: the message is never written.  ``cut-after:sent``: it is written
  and our send queue has drained (it reached the peer's kernel), then the cut.
  ``cut-before:recv``: the message is dropped unprocessed.  ``cut-after:recv``: it is
  processed, then the cut.
* The cut aborts every TCP connection of the session (RST) once; reconnecting works
  normally afterwards (a test that needs the link to stay down blocks the network).

This is how the fault-injection suite reaches every message boundary of the
switchover; nothing sets the variable in production.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from migrated.errors import ConfigError
from migrated.protocol import events as ev

__all__ = ["FaultPlan", "from_environment"]

log = logging.getLogger(__name__)

ENV = "MIGRATED_FAULT"
_MESSAGES = {t.__name__: t for t in ev.WIRE_EVENT_TYPES}


@dataclass
class FaultPlan:
    """One armed cut.  :meth:`due` is called for every message sent or received; it
    returns True exactly once, at the matching occurrence."""

    before: bool
    sent: bool
    message: type
    occurrence: int = 1

    def __post_init__(self) -> None:
        self._seen = 0
        self._fired = False
        self._lock = threading.Lock()  # BULK threads count too

    def due(self, event: object, *, sent: bool, before: bool) -> bool:
        if self._fired or sent != self.sent or type(event) is not self.message:
            return False
        with self._lock:
            if before:
                self._seen += 1
            if self._seen != self.occurrence or before != self.before:
                return False
            self._fired = True
        log.warning("fault injected: %s", self.describe())
        return True

    def describe(self) -> str:
        action = "cut-before" if self.before else "cut-after"
        direction = "sent" if self.sent else "recv"
        return f"{action}:{direction}:{self.message.__name__}:{self.occurrence}"


def parse(text: str) -> FaultPlan:
    """Parse ``ACTION:DIRECTION:MESSAGE[:N]``; raises ConfigError naming what is wrong."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise ConfigError(f"{ENV}={text!r}: expected ACTION:DIRECTION:MESSAGE[:N]")
    action, direction, name = parts[:3]
    if action not in ("cut-before", "cut-after"):
        raise ConfigError(f"{ENV}={text!r}: ACTION must be cut-before or cut-after")
    if direction not in ("sent", "recv"):
        raise ConfigError(f"{ENV}={text!r}: DIRECTION must be sent or recv")
    message = _MESSAGES.get(name)
    if message is None:
        raise ConfigError(
            f"{ENV}={text!r}: unknown message {name!r}; known: {', '.join(sorted(_MESSAGES))}"
        )
    occurrence = 1
    if len(parts) == 4:
        if not parts[3].isdigit() or int(parts[3]) < 1:
            raise ConfigError(f"{ENV}={text!r}: N must be a positive integer")
        occurrence = int(parts[3])
    return FaultPlan(action == "cut-before", direction == "sent", message, occurrence)


def from_environment() -> FaultPlan | None:
    """The plan armed by ``$MIGRATED_FAULT``, or None."""
    text = os.environ.get(ENV, "")
    return parse(text) if text else None
