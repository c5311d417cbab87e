"""Recovery: reconnect a paused postcopy migration, for as long as it takes.

After the commit the VM runs on the destination and the source holds the only copy of
the pages it has not received; giving up would lose the VM, so the source never does
by itself.  It retries with backoff (capped at ``max_retry_interval_s``), at once when
the operator runs ``migrated recover`` (optionally with a new address), and stops only
when the operator abandons the migration (``migrated cont --force``).
``recovery_timeout_s`` bounds how long ``migrated send`` waits, not this.

A resumed MAIN (``Hello(resume=true)``) is answered by the destination with
``ReceivedBitmap`` (the guest runs there: push what it lacks), with ``Ready`` (it
never got our Commit: send it again) or with ``Complete`` (every page had arrived).
Then URGENT reopens and outstanding requests are re-issued by the destination.

:func:`withdraw` is the other direction: a source that failed *before* the commit but
after ``VmState`` may have left the destination holding the state, in doubt; it
reconnects and sends ``Cancel`` so the destination drops it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from migrated.errors import LinkLost, MigratedError, PeerRefused
from migrated.protocol import Cancel, ChannelRole, Commit, Complete, ErrorCode, ReceivedBitmap
from migrated.protocol.state import MigrationState

if TYPE_CHECKING:
    from .engine import SourceEngine

__all__ = ["recover", "withdraw"]

S = MigrationState
_FIRST_RETRY_S = 0.2


async def recover(eng: SourceEngine) -> None:
    """Return once the session is POSTCOPY_ACTIVE again.  Raises MigrationAborted
    only when the operator abandons the migration."""
    delay = _FIRST_RETRY_S
    eng.paused_since = time.monotonic()
    reason = eng.session.lost_reason or "the link was lost"
    eng.log.event(
        "postcopy-paused",
        "postcopy paused: %s; the VM runs on the destination, reconnecting",
        reason,
    )
    eng.event("link-lost", error=reason)
    eng.state_changed()
    while True:
        if eng.session.state is S.COMPLETED:
            return  # the destination's Complete arrived: nothing left to recover
        eng.check_abandoned()
        try:
            await _resume(eng)
        except MigratedError as exc:
            if eng.session.state is S.POSTCOPY_RECOVER:
                eng.link.cut(str(exc))  # back to POSTCOPY_PAUSED
            _report_failed_attempt(eng, exc, delay)
            eng.state_changed()
            await eng.wait_for_retry(delay)
            delay = min(delay * 2, eng.opts.max_retry_interval_s)
            continue
        eng.stats.recoveries += 1
        eng.paused_since = None
        eng.log.event("recovered", "postcopy recovered (attempt %d)", eng.stats.recoveries)
        eng.event("recovered", recoveries=eng.stats.recoveries)
        eng.state_changed()
        return


def _report_failed_attempt(eng: SourceEngine, exc: MigratedError, delay_s: float) -> None:
    code = getattr(exc, "code", "")
    if code == ErrorCode.SESSION_UNKNOWN:
        # The destination lost the session (restarted?): if it ran the VM, that copy
        # is gone.  Only the operator can decide; keep trying meanwhile.
        eng.log.error(
            "the destination does not know this migration any more: %s; if it was running "
            "the VM, that copy is lost and `migrated cont --force` resumes the VM here from "
            "its state at the switchover",
            exc,
        )
    else:
        eng.log.info("recovery attempt failed: %s; retrying in %.1f s", exc, delay_s)
    eng.event("recovery-failed", error=str(exc), retry_in_s=round(delay_s, 1))


async def _resume(eng: SourceEngine) -> None:
    opts = eng.opts
    eng.answers.new_trouble()
    eng.session.table.begin_recovery()
    await eng.link.open(
        ChannelRole.MAIN, eng.host, eng.port, resume=True, timeout_s=opts.connect_timeout_s
    )
    answer = await eng.until(
        eng.answers.resumed, timeout_s=opts.connect_timeout_s, what="the answer to the resumed MAIN"
    )
    if isinstance(answer, Complete):
        # Every page had arrived before the link went: the destination says so.
        eng.log.info("the destination had every page: it answered the resumed MAIN with Complete")
        return
    if isinstance(answer, ReceivedBitmap):
        assert answer.data is not None
        eng.cursor.reset(eng.received_bitmap(answer.data))
    else:  # Ready: the destination never received our Commit
        # It holds exactly what preceded VmState: what a push claimed since never
        # arrived (pages that overtook the Commit are installed once, duplicates ignored).
        assert eng.sent_at_commit is not None
        eng.cursor.reset(eng.sent_at_commit)
        eng.link.send_main(Commit())
        eng.log.info("the destination had not received Commit: sent it again")
    await eng.link.open(
        ChannelRole.URGENT, eng.host, eng.port, resume=True, timeout_s=opts.connect_timeout_s
    )
    if eng.session.state is not S.POSTCOPY_ACTIVE:
        raise LinkLost(f"recovery ended in state {eng.session.state.value}")


async def withdraw(eng: SourceEngine) -> bool:
    """Tell a destination that may hold our VM state in doubt that we kept the VM.
    Returns True once it acknowledged (it closes the session) or said it holds
    nothing; False when it cannot be reached."""
    try:
        ch = await eng.link.open(
            ChannelRole.MAIN,
            eng.host,
            eng.port,
            resume=True,
            timeout_s=eng.opts.connect_timeout_s,
        )
    except PeerRefused as exc:
        eng.log.info("withdraw: the destination holds nothing of this migration (%s)", exc)
        return True
    except MigratedError as exc:
        eng.log.info("withdraw: destination unreachable: %s", exc)
        return False
    try:
        ch.send(Cancel("the source resumed the VM before committing it"))
        await ch.drain()
    except MigratedError as exc:
        eng.log.info("withdraw: %s", exc)
        return False
    finally:
        ch.close()
    eng.log.info("withdrew the VM state from the destination")
    return True
