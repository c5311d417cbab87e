"""A migration that fails before the commit: the VM runs here again, unchanged.

Until ``Commit`` is written the destination cannot run the guest, so every failure —
a dead link, an Error, a refusal, the operator's cancel, a local error — is undone
here: the destination is told (``Cancel`` or ``Error``) while MAIN still works, dirty
logging goes off, the paused VM resumes, and :class:`MigrationAborted` says in which
phase, on which side and why.  If the destination may be holding our ``VmState`` in
doubt (it went out and MAIN did not survive to say otherwise), the engine's
``needs_withdraw`` asks for a later withdrawal (``recovery.withdraw``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, NoReturn

from migrated.errors import (
    LinkLost,
    MigratedError,
    MigrationAborted,
    PeerRefused,
    RemoteProtocolError,
    TransportError,
)
from migrated.protocol import Cancel, Error
from migrated.protocol.state import MigrationState

if TYPE_CHECKING:
    from .engine import SourceEngine

__all__ = ["Cancelled", "abort", "fault_side", "phase_name"]

S = MigrationState


class Cancelled(MigratedError):
    """Internal: the operator cancelled before the commit."""


def phase_name(state: MigrationState) -> str:
    """The phase a state belongs to, as an operator says it."""
    return {S.ACTIVE: "precopy", S.DEVICE: "switchover (device state)"}.get(state, state.value)


def fault_side(exc: BaseException) -> str:
    """Which side a failure before the commit came from: the network and the peer's
    refusals are the destination's side, everything else happened here."""
    if isinstance(exc, TransportError | PeerRefused | RemoteProtocolError):
        return "destination"
    return "source"


async def abort(eng: SourceEngine, exc: BaseException, cancel_reason: str | None) -> NoReturn:
    """Before the commit: resume the VM here, unchanged, then raise what happened
    (MigrationAborted; a CancelledError as itself).  After it: re-raise ``exc``."""
    if eng.session.point_of_no_return:
        raise exc  # Commit went out: never resume here
    cancelled = isinstance(exc, Cancelled)
    reason = str(exc) or type(exc).__name__
    main = eng.link.main
    if main is not None and main.is_open:
        try:
            if cancelled:
                main.send(Cancel(cancel_reason or "cancelled"))
            elif not isinstance(exc, PeerRefused | LinkLost):
                code = getattr(exc, "code", "internal")
                main.send(Error(code, f"source: {reason}"[:4000]))
        except MigratedError as err:
            eng.log.info("could not tell the destination: %s", err)
    else:
        # The destination may hold our VmState and wait for a Commit in doubt.
        eng.needs_withdraw = eng.state in (S.DEVICE, S.READY) or eng.paused
    if not eng.state.terminal:
        eng.link.cut(reason)
    try:
        await asyncio.to_thread(eng.dirty_log.disable)
    except OSError as err:  # the VM still runs correctly without; say so
        eng.log.warning("could not switch dirty logging off: %s", err)
    if eng.paused:
        await asyncio.to_thread(eng.machine.resume)
        eng.paused = False
    eng.stats.error = reason
    eng.state_changed()
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    phase = phase_name(eng.session.table.before_end)
    if cancelled:
        what = f"cancelled in {phase}"
    else:
        what = f"failed in {phase} on the {fault_side(exc)} side"
    eng.log.event("failed", "migration %s: %s; the VM runs here again", what, reason)
    raise MigrationAborted(
        f"migration to {eng.host}:{eng.port} {what}: {reason}; the VM is running on "
        "the source, unchanged"
    ) from exc
