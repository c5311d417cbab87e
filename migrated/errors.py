"""Every error migrated raises on purpose, in one tree.

Every error carries a human sentence (``str(err)``) that says what happened, and a
``hint`` that says what the operator should do next.  Wrappers keep ``__cause__``.
``exit_code`` is what the command line exits with when the error ends a command.

::

    MigratedError
    ├── ConfigError              (2) a config file, flag or control request is invalid
    ├── PreflightError           (2) the host lacks /dev/kvm, userfaultfd, a capability
    ├── StateError               (5) the command is not valid in the current state
    │   └── MachineStateError        ... of the VM (paused, stopped, closed)
    ├── ResourceError            (1) the host cannot hold what was asked for
    │   └── InsufficientMemory       ... not enough memory for a guest (admission)
    ├── GuestError               (1) the guest or its image
    │   ├── GuestBuildError      (2) a built-in guest cannot be built (tool, compiler, name)
    │   ├── GuestCrashed             the guest stopped abnormally (triple fault, ...)
    │   └── VmStateError             a VM state record is malformed or does not fit
    ├── ProtocolError            (1) the wire conversation broke its rules
    │   ├── LocalProtocolError       we tried to do something the protocol forbids (a bug)
    │   └── RemoteProtocolError      the peer sent something invalid
    ├── PeerRefused              (1) the peer refused legitimately (Error frame: it
    │                                cannot host the VM, does not know the session...)
    ├── TransportError           (1) the network (mapped from OSError at one boundary,
    │   │                            migrated.transport.net)
    │   ├── ConnectFailed            cannot connect (refused, unreachable, timed out)
    │   ├── LinkLost                 an open connection broke (reset, EOF, no heartbeat)
    │   └── AuthorizationError       TLS handshake failed or the peer's identity is refused
    ├── ControlError             (n) an error reply from a VM process's control socket
    └── MigrationError               a migration ended without completing; the subclass
        │                            says where the VM is, the first thing an operator
        │                            needs to know:
        ├── MigrationAborted     (1) before the commit: the VM runs on the source, unchanged
        ├── PostcopyPaused       (3) after the commit: the VM runs on the destination;
        │                            the source holds the rest of its memory and keeps
        │                            retrying; `migrated recover` resumes
        └── VmStateUnknown       (4) the VM process went away; where the VM is cannot
                                     be known from here

``asyncio.CancelledError`` is never wrapped: it always propagates.
"""

from __future__ import annotations


class MigratedError(Exception):
    """Base class. ``hint`` says what to do next (may be empty)."""

    hint: str = ""
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        # A reason is never empty: an operator cannot act on a blank message.
        super().__init__(message or f"{type(self).__name__} without a reason (a bug in migrated)")
        if hint is not None:
            self.hint = hint

    def describe(self) -> str:
        """The message and, on a second line, the hint."""
        text = str(self)
        if self.hint:
            text += f"\n  what to do: {self.hint}"
        return text


class ConfigError(MigratedError):
    """A configuration file, command line or control request is invalid.  Names the key
    or flag."""

    exit_code = 2


class PreflightError(MigratedError):
    """The host lacks something migrated needs (/dev/kvm, userfaultfd, a capability)."""

    exit_code = 2


class StateError(MigratedError):
    """The command is not valid in the current state; nothing was changed."""

    exit_code = 5


class MachineStateError(StateError):
    """An operation is not valid in the machine's current run state (or it failed to
    get there, e.g. a vCPU could not load its initial state)."""


class ResourceError(MigratedError):
    """The host cannot hold what was asked for."""


class InsufficientMemory(ResourceError):
    """This host cannot hold a guest's memory (see :mod:`migrated.vmm.admission`).

    The message names the memory needed, the memory available and the limit that
    binds (MemAvailable, a memory cgroup's limit, free huge pages); the hint says how
    to raise that limit.  Nothing was changed.
    """


class GuestError(MigratedError):
    """The guest, its image or its state."""


class GuestBuildError(GuestError):
    """A built-in guest could not be built (missing tool, compiler error, unknown name)."""

    exit_code = 2


class GuestCrashed(GuestError):
    """The guest stopped abnormally (triple fault, unexpected exit)."""


class VmStateError(GuestError):
    """A VM state record is malformed, of another version, or does not fit this VM."""

    hint = "the state record was produced by an incompatible migrated version or is corrupt"


class ProtocolError(MigratedError):
    """The wire conversation broke its rules.  ``code`` is sent in the Error frame."""

    def __init__(self, message: str, *, code: str = "protocol", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids: a bug in migrated."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid.  Nothing it sent past that point is applied."""


class PeerRefused(MigratedError):
    """The peer answered with an Error frame: a legitimate refusal (it cannot host the
    VM, does not know the session, was cancelled...).  ``code`` is the frame's code."""

    def __init__(self, message: str, *, code: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


class TransportError(MigratedError):
    """The network failed.  Raised only by migrated.transport, which maps OSError,
    TimeoutError and ssl errors into this branch at one place."""


class ConnectFailed(TransportError):
    """A connection could not be opened (refused, unreachable, timed out)."""

    hint = "check the address, that the destination listens there, and the firewall"


class LinkLost(TransportError):
    """An open connection broke: reset, unexpected EOF, or no heartbeat for too long."""


class AuthorizationError(TransportError):
    """A peer was refused: TLS handshake failed (no certificate, another CA, expired)
    or its identity is not in the allowed list."""


class ControlError(MigratedError):
    """An error reply from a VM process (carries its exit code and hint)."""

    def __init__(self, message: str, *, hint: str = "", exit_code: int = 1) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


class MigrationError(MigratedError):
    """A migration ended without completing."""


class MigrationAborted(MigrationError):
    """Failed before the commit: the VM still runs on the source, unchanged."""

    exit_code = 1
    hint = (
        "the VM is still running on the source, unchanged; fix the cause and run the same "
        "`migrated send` again"
    )


class PostcopyPaused(MigrationError):
    """After the commit, the link failed and has not come back within the time the
    caller waits: the VM runs on the destination, the source holds the rest of its
    memory and keeps reconnecting."""

    exit_code = 3
    hint = (
        "the VM runs on the destination; do NOT restart it on the source. The source "
        "keeps reconnecting; once the link is back run `migrated recover --control SOCKET "
        "[--to HOST:PORT]` (or the same `migrated send` again) to finish"
    )


class VmStateUnknown(MigrationError):
    """Where the VM runs cannot be established from here."""

    exit_code = 4
    hint = "check both hosts with `migrated status` before doing anything else"
