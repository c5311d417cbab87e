"""The root of every error migrated raises on purpose.

Every error carries a human sentence (``str(err)``) that says what happened, and a
``hint`` that says what the operator should do next.  Wrappers keep ``__cause__``.

The classes that end a migration are split by where the VM is afterwards, because
that is the first thing an operator needs to know:

* :class:`MigrationAborted`: the migration failed *before* the point of no return;
  the VM is still running on the source, unchanged.
* :class:`PostcopyInterrupted`: the migration failed *after* the destination ran the
  guest; the VM lives on the destination (paused where it waits for pages) and the
  source must never run it again.
* :class:`VmStateUnknown`: neither can be established.
"""

from __future__ import annotations


class MigratedError(Exception):
    """Base class. ``hint`` says what to do next (may be empty)."""

    hint: str = ""
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def describe(self) -> str:
        """The message and, on a second line, the hint."""
        text = str(self)
        if self.hint:
            text += f"\n  what to do: {self.hint}"
        return text


class ConfigError(MigratedError):
    """A configuration file or command line is invalid.  Names the key or flag."""

    exit_code = 2


class PreflightError(MigratedError):
    """The host lacks something migrated needs (/dev/kvm, userfaultfd, a capability)."""

    exit_code = 2


class AuthorizationError(MigratedError):
    """A peer was refused: no certificate, another CA, or an identity not allowed."""

    exit_code = 1


class InsufficientMemory(MigratedError):
    """This host cannot hold a guest's memory (see :mod:`migrated.vmm.admission`).

    The message names the memory needed, the memory available and the limit that
    binds (MemAvailable, a memory cgroup's limit, free huge pages); the hint says how
    to raise that limit.  Nothing was changed.
    """

    exit_code = 1


class GuestCrashed(MigratedError):
    """The guest stopped abnormally (triple fault, unexpected exit)."""


class ProtocolError(MigratedError):
    """The wire conversation broke its rules.  ``code`` is sent in the ERROR frame."""

    def __init__(self, message: str, *, code: str = "protocol", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids: a bug in migrated."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid.  Nothing it sent past that point is applied."""


class MigrationError(MigratedError):
    """A migration did not complete."""


class MigrationAborted(MigrationError):
    """Failed before the point of no return: the VM still runs on the source, unchanged."""

    exit_code = 1
    hint = "the VM is still running on the source; fix the cause and run the migration again"


class PostcopyInterrupted(MigrationError):
    """Failed after the destination ran the guest: the VM now lives on the destination."""

    exit_code = 3
    hint = (
        "the VM is on the destination; do NOT restart it on the source. "
        "Reconnect with `migrated send --resume` to finish the migration"
    )


class VmStateUnknown(MigrationError):
    """Where the VM runs cannot be established."""

    exit_code = 4
    hint = "check both hosts with `migrated status` before doing anything else"
