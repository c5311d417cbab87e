"""Postcopy on the source: answer page requests at once, push the rest, finish.

The guest runs on the destination.  A ``PageRequest`` is answered on the connection it
came on (URGENT, or MAIN when there is none) from the loop, before anything else that
connection carries; the background push runs on a BULK connection from a thread
(:func:`~migrated.engine.source.push.push_thread`), or on MAIN from the loop when the
destination refuses BULK.  ``AllSent`` follows the push on MAIN; ``Complete`` from
the destination (every page installed) ends the migration.

A lost link pauses everything (the push thread is stopped and joined) and hands over
to recovery, which returns once the destination is back; then the push resumes from
the destination's received bitmap.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from migrated.errors import LinkLost, MigratedError, MigrationAborted, PeerRefused
from migrated.protocol import AllSent, ChannelRole, PageRequest, Pages
from migrated.protocol.state import MigrationState
from migrated.transport import net
from migrated.transport.blocking import BlockingChannel
from migrated.transport.channel import Channel

from ..ram import PAGE_SIZE
from ..threads import Worker
from .push import PushCounters, push_on_main, push_thread
from .recovery import recover

if TYPE_CHECKING:
    from .engine import SourceEngine

__all__ = ["run_postcopy", "serve_request"]

S = MigrationState
_PUSH_AFTER_RUNNING_S = 0.02


def serve_request(eng: SourceEngine, ch: Channel, req: PageRequest) -> None:
    """Answer ``req`` on the channel it came on, now (on the loop)."""
    ram, stats = eng.ram, eng.stats
    first = ram.page_of_gpa(req.gpa)
    stats.postcopy_requests += 1
    stats.postcopy_requested_pages += req.npages
    for frame in ram.frames(
        first, req.npages, eng.opts.frame_pages, eng.zero_scratch, req.request_id
    ):
        ch.send(frame)
        if isinstance(frame, Pages):
            stats.postcopy_bytes += frame.npages * PAGE_SIZE
        stats.urgent_pages_sent += frame.npages
    eng.cursor.mark(first, req.npages)
    # Locality: the guest will likely touch what follows next.
    eng.cursor.jump(first + req.npages)


async def run_postcopy(eng: SourceEngine) -> None:
    """From Commit to Complete, recovering from every link loss.  Raises only what
    ends the migration for good (the operator abandoning it)."""
    t0 = time.monotonic()
    # The push starts once the destination says the guest runs (or after a grace
    # period: pages are wanted there from the Commit on, and faults are answered
    # meanwhile).  Started at once, its two busy threads (ours, the destination's
    # receiver) took the CPUs from the loops that carry Commit and Running: on two
    # cores Commit -> Running went from ~0.5 ms to 0.7-2.4 ms, all of it downtime.
    await asyncio.wait([eng.answers.running, eng.answers.complete], timeout=_PUSH_AFTER_RUNNING_S)
    while True:
        if eng.session.state is S.COMPLETED:
            break  # Complete came in answer to a recovery
        try:
            await _push(eng)
            if eng.session.state is S.POSTCOPY_ACTIVE:
                eng.link.send_main(AllSent())
                eng.event("all-sent")
            await eng.until(eng.answers.complete, what="the destination's Complete")
            break
        except MigrationAborted:
            raise  # the operator abandoned it
        except Exception as exc:
            if eng.session.state is S.COMPLETED:
                break
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled (the process is stopping) and something failed on the way
                # out: the cancellation is what ends this, not a reason to recover.
                eng.log.info("postcopy cancelled (%s on the way out)", exc)
                raise asyncio.CancelledError from exc
            if not isinstance(exc, LinkLost | PeerRefused):
                # Not the link.  Giving up would strand the VM (the destination needs
                # the pages only this process holds): log it and start over through
                # recovery, which rebuilds every connection and the push.
                eng.log.error("postcopy failed here: %s; recovering", exc, exc_info=exc)
            eng.link_lost(str(exc))
            await recover(eng)
    eng.stats.postcopy_s = time.monotonic() - t0


async def _push(eng: SourceEngine) -> None:
    """Push every unsent page (BULK thread, or MAIN when BULK is refused)."""
    opts = eng.opts
    counters = PushCounters()
    try:
        if opts.bulk_channel and not eng.bulk_refused:
            eng.stats.push_channel = "bulk"
            try:
                await _push_on_bulk(eng, counters)
                return
            except PeerRefused as exc:
                if counters.payload_bytes or eng.session.state is not S.POSTCOPY_ACTIVE:
                    raise
                # A destination without BULK support: push on MAIN instead.
                eng.bulk_refused = True
                eng.event("bulk-refused", reason=str(exc))
            except LinkLost as exc:
                # Losing BULK alone is not losing the link (MAIN's heartbeat decides
                # that): push the rest on MAIN.  What the broken connection had claimed
                # but not delivered, the destination asks for after AllSent.
                if eng.session.state is not S.POSTCOPY_ACTIVE or eng.link.main is None:
                    raise
                eng.log.warning("the BULK connection failed (%s): pushing the rest on MAIN", exc)
        eng.stats.push_channel = "main"
        await push_on_main(
            eng.link,
            ram=eng.ram,
            cursor=eng.cursor,
            frame_pages=opts.frame_pages,
            pacer=eng.postcopy_pacer,
            counters=counters,
        )
    finally:
        eng.stats.postcopy_bytes += counters.payload_bytes
        eng.stats.normal_pages += counters.normal_pages
        eng.stats.zero_pages += counters.zero_pages


async def _push_on_bulk(eng: SourceEngine, counters: PushCounters) -> None:
    opts = eng.opts
    conn, hello = eng.link.connect_thread(ChannelRole.BULK, resume=eng.stats.recoveries > 0)
    try:
        sock = await asyncio.to_thread(
            net.connect_blocking,
            eng.host,
            eng.port,
            security=eng.security,
            timeout_s=opts.connect_timeout_s,
        )
    except MigratedError:
        eng.session.connection_lost(conn, "")
        raise
    bc = BlockingChannel(sock, conn, eng.session, name="bulk")
    eng.link.adopt_thread(bc)
    eng.pusher = counters
    worker = Worker(
        "migrated-push",
        lambda w: push_thread(
            w,
            bc,
            hello,
            ram=eng.ram,
            cursor=eng.cursor,
            frame_pages=opts.frame_pages,
            bandwidth_bytes_per_s=opts.postcopy_bandwidth,
            counters=counters,
        ),
        on_stop=bc.stop,
        nice=10,
    )
    failure: BaseException | None = None
    try:
        async with worker:
            # The push ends by itself, or the link's trouble ends it (stop + join).
            await eng.until(worker.done, what="the background push")
    except BaseException as exc:
        failure = exc
        raise
    finally:
        eng.pusher = None
        bc.close()
        eng.link.thread_closed(bc, failure)
