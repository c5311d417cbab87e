"""The source engine: moves a running :class:`Machine` to a destination.

Phases (QEMU's words): setup → active (optional precopy rounds with the dirty log) →
switchover (pause, final dirty sync, discards, device state) → postcopy-active
(background push + urgent page service) → completed.  After completion the VM is
destroyed here and its memory released.

Where the VM is when something fails is the contract:

* before ``VmState`` is sent, any failure or cancel resumes the VM here, unchanged
  (dirty logging switched off again): :class:`MigrationAborted`;
* after it, the VM stays paused here for good.  If the destination refuses the state
  on MAIN (it never ran the guest) the VM resumes here (:class:`MigrationAborted`);
  a broken link means ``postcopy-paused``: the engine keeps reconnecting with the
  same session id until ``recovery_timeout_s`` runs out
  (:class:`PostcopyInterrupted`; the memory stays here for a later ``recover``).

Threads: everything runs on the event loop thread of the VM process.  Guest memory is
read here only (never written), so no access can block.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from migrated.errors import (
    MigrationAborted,
    PostcopyInterrupted,
    ProtocolError,
    VmStateUnknown,
)
from migrated.kernel import PageBitmap
from migrated.protocol import (
    FEATURE_CHECKSUM_XXH3,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    AllSent,
    Cancel,
    ChannelRole,
    Complete,
    CompleteAck,
    Discard,
    DiscardBitmap,
    Error,
    Hello,
    PageRequest,
    Pages,
    PrecopyRoundEnd,
    Progress,
    ReceivedBitmap,
    Role,
    Running,
    Setup,
    SetupAck,
    Switchover,
    VmState,
    Welcome,
    ZeroPages,
)
from migrated.protocol.connection import Connection
from migrated.protocol.state import MigrationState, SessionState
from migrated.vmm.machine import Runstate

from .bulk import BulkPusher
from .channel import Channel, ChannelClosedError, connect
from .ram import PAGE_SIZE, GuestRam
from .stats import MigrationStats, Pacer, StepTimer

__all__ = ["Mode", "SendOptions", "SourceEngine"]

Emit = Callable[[dict[str, Any]], None]


class Mode(enum.Enum):
    POSTCOPY = "postcopy"  # switch over at once
    HYBRID = "hybrid"  # precopy rounds, then postcopy
    PRECOPY = "precopy"  # classic: converge, then move the rest while paused


@dataclass(frozen=True)
class SendOptions:
    mode: Mode = Mode.HYBRID
    max_precopy_rounds: int = 5
    precopy_time_limit_s: float = 60.0
    #: precopy mode switches over once a round's dirty set is at most this many pages
    converge_pages: int = 1024
    frame_pages: int = 256  # 1 MiB page frames (urgent answers are single pages)
    checksum: bool = False
    connect_timeout_s: float = 10.0
    running_timeout_s: float = 60.0
    recovery_timeout_s: float = 300.0
    #: push postcopy pages on a BULK connection from a thread (MAIN if refused)
    bulk_channel: bool = True
    progress_interval_s: float = 0.25
    #: a MAIN channel silent this long is declared dead (both sides send heartbeats)
    heartbeat_timeout_s: float = 5.0
    #: bandwidth caps in bytes/s (0: unlimited), as virsh's --bandwidth and
    #: --postcopy-bandwidth: precopy and switchover, and the postcopy background push
    precopy_bandwidth: int = 0
    postcopy_bandwidth: int = 0


# Above this many stale runs at switchover, one DiscardBitmap frame is cheaper.
_MAX_DISCARD_FRAMES = 32


# States in which the destination's heartbeats must keep arriving.
_WATCHED = (MigrationState.ACTIVE, MigrationState.DEVICE, MigrationState.POSTCOPY_ACTIVE)


class _Switch(Exception):
    """Internal: leave precopy now."""


class _Cancelled(Exception):
    """Internal: the operator cancelled before the point of no return."""


class SourceEngine:
    """One outgoing migration of ``machine`` to ``host:port``.

    ``emit`` receives progress and state events as JSON-ready dicts.  Use
    :meth:`request_switchover` ("switch to postcopy now") and :meth:`cancel` from
    other tasks; :meth:`run` returns the final statistics or raises one of the
    errors named in the module docstring.
    """

    def __init__(
        self, machine: Any, host: str, port: int, options: SendOptions, emit: Emit | None = None
    ) -> None:
        self.machine = machine
        self.host, self.port = host, port
        self.opts = options
        self.emit: Emit = emit or (lambda e: None)
        self.ram = GuestRam([(r.gpa, r.memory) for r in machine.regions])
        self.session = SessionState(Role.SOURCE)
        self.session_id = os.urandom(16)
        self.stats = MigrationStats(
            role="source",
            mode=options.mode.value,
            vm_name=machine.config.name,
            ram_bytes=self.ram.nbytes,
            total_pages=self.ram.total_pages,
        )
        self.sent = PageBitmap(self.ram.total_pages)
        self._zero_scratch = PageBitmap(options.frame_pages)
        self._main: Channel | None = None
        self._urgent: Channel | None = None
        self._switch_requested = False
        self._cancel_reason: str | None = None
        self._push_cursor = 0
        self._jump_to: int | None = None
        self._phase = "setup"
        self._running: asyncio.Future[None] | None = None
        self._complete: asyncio.Future[int] | None = None
        self._failure: asyncio.Future[None] | None = None
        self._reconnect_now = asyncio.Event()
        self._t0 = time.monotonic()
        self._precopy_pacer = Pacer(options.precopy_bandwidth)
        self._postcopy_pacer = Pacer(options.postcopy_bandwidth)
        self._guest_runs = True  # until the switchover pauses it
        self._sent_lock = threading.Lock()
        self._dest_received_bytes = 0
        self._pusher: BulkPusher | None = None
        self._bulk_refused = False

    # -- control from other tasks ------------------------------------------------------

    def request_switchover(self) -> None:
        self._switch_requested = True

    def cancel(self, reason: str = "cancelled by the operator") -> bool:
        """Cancel before the point of no return.  Returns False when it is too late."""
        if self.session.state not in (MigrationState.SETUP, MigrationState.ACTIVE):
            return False
        self._cancel_reason = reason
        return True

    def recover_now(self, host: str | None = None, port: int | None = None) -> None:
        """Retry the postcopy recovery at once (optionally to a new address)."""
        if host is not None:
            self.host = host
        if port is not None:
            self.port = port
        self._reconnect_now.set()

    @property
    def state(self) -> MigrationState:
        return self.session.state

    # -- the migration -----------------------------------------------------------------

    async def run(self) -> MigrationStats:
        loop = asyncio.get_running_loop()
        self._running = loop.create_future()
        self._complete = loop.create_future()
        self._failure = loop.create_future()
        self._state_event()
        reporter = asyncio.create_task(self._report_progress())
        try:
            return await self._run()
        except BaseException as exc:
            self.stats.status = self.session.state.value
            self.stats.error = str(exc)
            raise
        finally:
            reporter.cancel()
            self.stats.total_s = time.monotonic() - self._t0
            for ch in (self._main, self._urgent):
                if ch is not None:
                    ch.close()
            for fut in (self._running, self._complete, self._failure):
                if fut.done() and not fut.cancelled():
                    fut.exception()  # consumed: failures were turned into our errors

    async def _run(self) -> MigrationStats:
        # ---- before the point of no return: every failure leaves the VM running here.
        try:
            await self._setup()
            if self.opts.mode is not Mode.POSTCOPY:
                await self._precopy()
        except _Switch:
            pass
        except BaseException as exc:
            await self._abort_before_switchover(exc)
            raise AssertionError("unreachable") from exc
        await self._switchover()
        # ---- the VM is paused here; VmState is on its way.
        await self._await_running()
        self._phase = "postcopy"
        t_post = time.monotonic()
        await self._postcopy()
        self.stats.postcopy_s = time.monotonic() - t_post
        self._finish()
        return self.stats

    async def _abort_before_switchover(self, exc: BaseException) -> None:
        self._disable_dirty_log()
        cancelled = isinstance(exc, _Cancelled)
        try:
            if self._main is not None and not self._main.closed.done():
                if cancelled:
                    self._send_main(Cancel(self._cancel_reason or "cancelled"))
                elif not isinstance(exc, ChannelClosedError | ConnectionError):
                    code = getattr(exc, "code", "internal")
                    self._send_main(Error(code, f"source: {exc}"[:4000]))
        except Exception:
            pass  # the channel is going away anyway; the VM is what matters
        if self.session.state in (MigrationState.SETUP, MigrationState.ACTIVE):
            with contextlib.suppress(ProtocolError):
                self.session.link_lost()
        if self.machine.runstate is Runstate.PAUSED:
            self.machine.resume()
        self.stats.status = "cancelled" if cancelled else "failed"
        self._state_event()
        what = "cancelled" if cancelled else f"failed during {self._phase}"
        raise MigrationAborted(f"migration {what}: {exc}") from exc

    # -- setup -------------------------------------------------------------------------

    def _hello(self, role: ChannelRole, resume: bool = False) -> Hello:
        features = frozenset({FEATURE_CHECKSUM_XXH3}) if self.opts.checksum else frozenset()
        return Hello(
            PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, role, self.session_id, features, resume
        )

    async def _open(self, role: ChannelRole, resume: bool) -> Channel:
        conn = Connection(
            Role.SOURCE,
            role,
            max_frame_payload=self.opts.frame_pages * PAGE_SIZE,
            layout=self.ram.layout if (resume or role is not ChannelRole.MAIN) else None,
        )
        ch = await connect(
            self.host,
            self.port,
            conn,
            name=role.name.lower(),
            bulk=role is ChannelRole.MAIN,
            timeout_s=self.opts.connect_timeout_s,
        )
        hello = self._hello(role, resume)
        self.session.handle(hello, "sent", channel=role)
        ch.send(hello)
        reply = await ch.next_event(self.opts.connect_timeout_s)
        self.session.handle(reply, "received", channel=role)
        if isinstance(reply, Error):
            ch.close()
            raise ProtocolError(
                f"the destination refused the {role.name} connection: {reply.message}",
                code=reply.code,
            )
        assert isinstance(reply, Welcome)
        return ch

    async def _setup(self) -> None:
        t = time.monotonic()
        self._main = await self._open(ChannelRole.MAIN, resume=False)
        setup = Setup(
            self.machine.config.name,
            self.machine.config.uuid,
            self.ram.layout,
            self.machine.config.vcpus,
            self.opts.mode.value,
        )
        self._send_main(setup)
        reply = await self._main.next_event(self.opts.connect_timeout_s)
        self.session.handle(reply, "received")
        if isinstance(reply, Error):
            raise ProtocolError(f"the destination refused the VM: {reply.message}", code=reply.code)
        assert isinstance(reply, SetupAck)
        self._main.deliver_to(self._on_event)
        self._urgent = await self._open(ChannelRole.URGENT, resume=False)
        self._urgent.deliver_to(self._on_event)
        self.stats.setup_s = time.monotonic() - t
        self._phase = "precopy"
        self.stats.status = self.session.state.value
        self._state_event()

    # -- events from the destination ----------------------------------------------------

    def _on_event(self, ch: Channel, event: Any) -> None:
        channel = ChannelRole[ch.name.upper()]
        if isinstance(event, Progress):
            # Heartbeat; in precopy also the destination's count of payload bytes
            # received (it answers every PrecopyRoundEnd with one).
            self._dest_received_bytes = event.bytes_sent
            return
        self.session.handle(event, "received", channel=channel)
        assert self._running and self._complete and self._failure
        if isinstance(event, PageRequest):
            if not self._running.done():
                self._running.set_result(None)  # a request proves the guest runs there
            self._serve_request(ch, event)
        elif isinstance(event, Running):
            if not self._running.done():
                self._running.set_result(None)
        elif isinstance(event, Complete):
            if not self._complete.done():
                self._complete.set_result(event.pages_installed)
        elif isinstance(event, Error) and not self._failure.done():
            self._failure.set_exception(
                ProtocolError(f"destination reported: {event.message}", code=event.code)
            )

    def _serve_request(self, ch: Channel, req: PageRequest) -> None:
        first = self.ram.page_of_gpa(req.gpa)
        self.stats.postcopy_requests += 1
        self.stats.postcopy_requested_pages += req.npages
        for frame in self.ram.frames(
            first, req.npages, self.opts.frame_pages, self._zero_scratch, req.request_id
        ):
            ch.send(frame)
            if isinstance(frame, Pages):
                self.stats.postcopy_bytes += frame.npages * PAGE_SIZE
            self.stats.urgent_pages_sent += frame.npages
        with self._sent_lock:  # the push thread reads and sets it too
            self.sent.set(first, req.npages)
        # Locality: the guest will likely touch what follows next.
        self._jump_to = first + req.npages
        if self._pusher is not None:
            self._pusher.jump(first + req.npages)

    # -- sending pages ------------------------------------------------------------------

    def _send_main(self, event: Any) -> None:
        assert self._main is not None
        self.session.handle(event, "sent")
        self._main.send(event)

    def _send_run(self, page: int, npages: int) -> int:
        """Send ``npages`` from ``page`` on MAIN as page/zero frames; returns bytes."""
        nbytes = 0
        for frame in self.ram.frames(page, npages, self.opts.frame_pages, self._zero_scratch):
            if isinstance(frame, ZeroPages):
                self.stats.zero_pages += frame.npages
            else:
                if self._guest_runs and self._main is not None and self._main.conn.checksum:
                    # The guest may rewrite the page before the queued bytes leave:
                    # checksum and send a snapshot (the dirty log resends it anyway).
                    assert frame.data is not None
                    frame = Pages(frame.gpa, frame.npages, memoryview(bytes(frame.data)))
                self.stats.normal_pages += frame.npages
                nbytes += frame.npages * PAGE_SIZE
            self._send_main(frame)
        return nbytes

    async def _send_bitmap(self, todo: PageBitmap) -> int:
        """Send every page set in ``todo`` (precopy), yielding to the loop as we go."""
        assert self._main is not None
        nbytes = 0
        for page, n in todo.runs(True, self.opts.frame_pages):
            self._check_interrupts()
            sent = self._send_run(page, n)
            nbytes += sent
            self.sent.set(page, n)
            await self._main.drain()
            await self._pace(self._precopy_pacer, sent)
        return nbytes

    @staticmethod
    async def _pace(pacer: Pacer, nbytes: int) -> None:
        delay_s = pacer.delay_s(nbytes)
        if delay_s:
            await asyncio.sleep(delay_s)

    def _check_interrupts(self) -> None:
        assert self._failure is not None
        if self._failure.done():
            self._failure.result()  # raises the destination's error
        if self._cancel_reason is not None:
            raise _Cancelled(self._cancel_reason)
        if self._switch_requested and self._phase == "precopy":
            raise _Switch()

    # -- precopy --------------------------------------------------------------------------

    def _set_dirty_log(self, on: bool) -> None:
        for r in self.machine.regions:
            self.machine.vm.set_memory_region(r.slot, r.gpa, r.memory, log_dirty=on)

    def _disable_dirty_log(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._set_dirty_log(False)

    def _fetch_dirty(self) -> PageBitmap:
        """Read (and clear) the dirty log of every region into one global bitmap."""
        dirty = PageBitmap(self.ram.total_pages)
        for r, rr in zip(self.machine.regions, self.ram.regions, strict=True):
            log = self.machine.vm.get_dirty_log(r.slot)
            region_bm = PageBitmap.from_bytes(rr.npages, log)
            if rr.first_page % 8 == 0:
                # Byte-aligned (always, with 4 KiB pages and 2 MiB-aligned regions): one
                # copy.  Per-run Python cost 10 ms of downtime for ~2000 scattered pages.
                start = rr.first_page // 8
                dirty.data[start : start + len(region_bm.data)] = region_bm.data
            else:
                for p, n in region_bm.runs(True):
                    dirty.set(rr.first_page + p, n)
        return dirty

    async def _precopy(self) -> None:
        t = time.monotonic()
        self._set_dirty_log(True)
        self._fetch_dirty()  # start from a clean log
        todo = PageBitmap(self.ram.total_pages)
        todo.fill()
        round_no = 0
        previous_dirty = None
        self._pending_dirty = PageBitmap(self.ram.total_pages)
        try:
            while True:
                round_no += 1
                t_round = time.monotonic()
                self.stats.precopy_bytes += await self._send_bitmap(todo)
                dirty = self._fetch_dirty()
                ndirty = dirty.count()
                self._pending_dirty = dirty
                elapsed = time.monotonic() - t_round
                self.stats.precopy_rounds = round_no
                self.stats.dirty_pages_per_round.append(ndirty)
                self.stats.dirty_rate_pages_per_s = ndirty / elapsed if elapsed > 0 else 0.0
                self._send_main(PrecopyRoundEnd(round_no, ndirty))
                self.emit({"event": "precopy-round", "round": round_no, "dirty_pages": ndirty})
                if self._precopy_done(round_no, ndirty, previous_dirty, t):
                    return
                previous_dirty = ndirty
                todo = dirty
                self._pending_dirty = PageBitmap(self.ram.total_pages)
        finally:
            self.stats.precopy_s = time.monotonic() - t

    def _precopy_done(self, round_no: int, ndirty: int, previous: int | None, t0: float) -> bool:
        if self._switch_requested:
            return True
        if self.opts.mode is Mode.PRECOPY and ndirty <= self.opts.converge_pages:
            return True
        if round_no >= self.opts.max_precopy_rounds:
            return True
        if time.monotonic() - t0 > self.opts.precopy_time_limit_s:
            return True
        # The dirty set stopped shrinking: more rounds only burn bandwidth.
        return previous is not None and ndirty > 0.95 * previous and self.opts.mode is Mode.HYBRID

    # -- switchover -----------------------------------------------------------------------

    async def _settle_main(self, timeout_s: float = 2.0) -> None:
        """Wait (bounded) until the destination has processed every precopy byte, as
        its answer to our last PrecopyRoundEnd says.  Whatever it still has to chew
        through at the pause lands inside the downtime: measured, 24 ms of a 31 ms
        hybrid downtime went to ~2000 single-page frames of the last round waiting in
        its receive buffer.  The VM still runs meanwhile."""
        if self._main is None:
            return
        target = self.stats.precopy_bytes
        deadline = time.monotonic() + timeout_s
        while self._dest_received_bytes < target and time.monotonic() < deadline:
            if self._main.closed.done():
                return
            await asyncio.sleep(0.0005)

    async def _switchover(self) -> None:
        if self.opts.mode is not Mode.POSTCOPY:
            await self._settle_main()
        self._phase = "switchover"
        t_pause = time.monotonic()
        self._downtime_t0 = t_pause
        mark = StepTimer(self.stats.downtime_breakdown_ms).mark

        try:
            self.machine.pause()
            self._guest_runs = False
            mark("pause")
            stale = getattr(self, "_pending_dirty", None) or PageBitmap(self.ram.total_pages)
            if self.opts.mode is not Mode.POSTCOPY:
                stale.or_count_new(self._fetch_dirty())
                # Logging stays on: switching it off updates the memslot (milliseconds
                # of downtime), and the paused VM is destroyed on success anyway.  An
                # abort switches it off before resuming the VM.
            mark("final-dirty-sync")
            self._send_main(Switchover())
            self._state_event()
            if self.opts.mode is Mode.PRECOPY:
                # Classic: everything still missing or stale goes now, VM paused.
                missing = self.sent.copy()
                missing.andnot(stale)
                todo = PageBitmap(self.ram.total_pages)
                todo.fill()
                todo.andnot(missing)
                self.stats.downtime_bytes += await self._send_bitmap(todo)
            else:
                stale_sent = stale.copy()
                only_unsent = stale.copy()
                only_unsent.andnot(self.sent)
                stale_sent.andnot(only_unsent)  # stale & sent
                self._send_discards(stale_sent)
                self.stats.discarded_pages = stale_sent.count()
                self.sent.andnot(stale_sent)
            mark("discards-or-final-pages")
            self.stats.downtime_bytes += self._send_resident()
            mark("resident-pages")
            blob = self.machine.capture_state().to_bytes()
            mark("capture-state")
            self._send_main(VmState(memoryview(blob)))
            self.stats.downtime_bytes += len(blob)
        except BaseException as exc:
            if self.session.state is MigrationState.DEVICE:
                raise  # VmState went out: handled by _await_running's rules
            await self._abort_before_switchover(exc)
        self._state_event()

    def _send_discards(self, stale: PageBitmap) -> None:
        """Tell the destination to drop ``stale``: a few Discard runs, or one
        DiscardBitmap frame when the set is scattered (per-frame cost dominates)."""
        runs: list[tuple[int, int]] = []
        for page, n in stale.runs(True, 1 << 16):
            runs.extend(self.ram.split(page, n, 1 << 16))
            if len(runs) > _MAX_DISCARD_FRAMES:
                self._send_main(DiscardBitmap(memoryview(stale.data)))
                return
        for p, m in runs:
            self._send_main(Discard(self.ram.gpa_of_page(p), m))

    def _send_resident(self) -> int:
        """Send the pages the destination must have before any vCPU runs (see
        ``Machine.resident_ranges``) unless they are already there and clean."""
        nbytes = 0
        for gpa, size in self.machine.resident_ranges():
            first = self.ram.page_of_gpa(gpa)
            todo = PageBitmap(self.ram.total_pages)
            todo.set(first, size // PAGE_SIZE)
            todo.andnot(self.sent)
            for page, n in todo.runs(True, self.opts.frame_pages):
                nbytes += self._send_run(page, n)
                self.sent.set(page, n)
        return nbytes

    async def _await_running(self) -> None:
        assert self._running and self._failure and self._main
        waiters = [self._running, self._failure, self._main.closed]
        _done, _ = await asyncio.wait(
            waiters, timeout=self.opts.running_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if self._running.done():
            self.stats.downtime_s = time.monotonic() - self._downtime_t0
            self.stats.downtime_breakdown_ms["wait-running"] = round(
                (self.stats.downtime_s - sum(self.stats.downtime_breakdown_ms.values()) / 1e3)
                * 1e3,
                3,
            )
            self._state_event()
            return
        if self._failure.done() and self.session.state is MigrationState.FAILED:
            # The destination refused the state on MAIN: it never ran the guest.
            exc = self._failure.exception()
            self.machine.resume()
            self.stats.status = "failed"
            self._state_event()
            raise MigrationAborted(
                f"the destination could not start the VM: {exc}; the VM was resumed on the source"
            ) from exc
        # Link lost or silence: the destination may or may not run the guest.
        if self.session.state is MigrationState.DEVICE:
            self.session.link_lost()
        self._state_event()
        recovered = await self._recover()
        if not recovered:
            raise VmStateUnknown(
                "the link to the destination broke right after the VM state was sent; "
                "whether the destination started the guest is unknown. The VM stays paused "
                "here",
                hint="check the destination with `migrated status`; if it runs the "
                "VM, finish with `migrated recover`; if not, resume here with `migrated cont`",
            )

    # -- postcopy ----------------------------------------------------------------------

    async def _postcopy(self) -> None:
        assert self._complete is not None
        while True:
            try:
                await self._push_all()
                await self._wait_complete()
                return
            except (ChannelClosedError, OSError, ProtocolError, TimeoutError) as exc:
                if self.session.state is MigrationState.COMPLETED:
                    return
                if self.session.state is MigrationState.POSTCOPY_ACTIVE:
                    self.session.link_lost()
                self.emit({"event": "link-lost", "error": str(exc)})
                self._state_event()
                if not await self._recover():
                    raise PostcopyInterrupted(
                        f"postcopy interrupted: {exc}; reconnecting failed for "
                        f"{self.opts.recovery_timeout_s:.0f} s"
                    ) from exc

    async def _push_all(self) -> None:
        """Background push of every page not yet sent: on a BULK connection from a
        thread (see engine.bulk), or on MAIN from the loop when BULK is refused."""
        if self.opts.bulk_channel and not self._bulk_refused:
            self.stats.push_channel = "bulk"
            await self._push_on_bulk()
        else:
            self.stats.push_channel = "main"
            await self._push_on_main()
        if self.session.state is MigrationState.POSTCOPY_ACTIVE:
            self._send_main(AllSent())
        self.emit({"event": "all-sent"})

    async def _push_on_bulk(self) -> None:
        assert self._main is not None and self._failure is not None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[BaseException | None] = loop.create_future()

        def finished(exc: BaseException | None) -> None:
            if not done.done():
                done.set_result(exc)

        hello = self._hello(ChannelRole.BULK)
        self.session.handle(hello, "sent", channel=ChannelRole.BULK)
        pusher = BulkPusher(
            ram=self.ram,
            sent=self.sent,
            lock=self._sent_lock,
            hello=hello,
            host=self.host,
            port=self.port,
            frame_pages=self.opts.frame_pages,
            bandwidth_bytes_per_s=self.opts.postcopy_bandwidth,
            connect_timeout_s=self.opts.connect_timeout_s,
            on_done=finished,
        )
        self._pusher = pusher
        pusher.start()
        waiters: list[asyncio.Future[Any]] = [done, self._failure, self._main.closed]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not done.done():
                pusher.stop()
            self._pusher = None
            self.stats.postcopy_bytes += pusher.bytes_sent
            self.stats.normal_pages += pusher.normal_pages
            self.stats.zero_pages += pusher.zero_pages
        if not done.done():
            if self._failure.done():
                self._failure.result()  # raises the destination's error
            exc = self._main.closed.exception() if self._main.closed.done() else None
            raise exc or ChannelClosedError("main channel closed during the push")
        failure = done.result()
        if isinstance(failure, ProtocolError) and pusher.bytes_sent == 0:
            # An older destination without BULK support: push on MAIN instead.
            self._bulk_refused = True
            self.stats.push_channel = "main"
            self.emit({"event": "bulk-refused", "reason": str(failure)})
            await self._push_on_main()
        elif failure is not None:
            raise failure

    async def _push_on_main(self) -> None:
        assert self._main is not None
        main = self._main
        wrapped = False
        while True:
            if self._jump_to is not None:
                self._push_cursor, self._jump_to = self._jump_to, None
                wrapped = False
            page, n = self.sent.find_run(self._push_cursor, False, self.opts.frame_pages)
            if page < 0:
                if wrapped or self._push_cursor == 0:
                    break
                self._push_cursor, wrapped = 0, True
                continue
            sent = self._send_run(page, n)
            self.stats.postcopy_bytes += sent
            with self._sent_lock:
                self.sent.set(page, n)
            await self._pace(self._postcopy_pacer, sent)
            self._push_cursor = page + n
            if self._failure is not None and self._failure.done():
                self._failure.result()
            if main.write_blocked:
                await main.drain()
            else:
                await asyncio.sleep(0)  # let urgent requests in

    async def _wait_complete(self) -> None:
        assert self._complete and self._failure and self._main and self._urgent
        waiters: list[asyncio.Future[Any]] = [
            self._complete,
            self._failure,
            self._main.closed,
            self._urgent.closed,
        ]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if self._complete.done():
            return
        for fut in waiters[1:]:
            if fut.done():
                exc = fut.exception()
                raise exc if exc is not None else ChannelClosedError("channel closed")

    # -- recovery ----------------------------------------------------------------------

    async def _recover(self) -> bool:
        """Reconnect with the same session id until recovery_timeout_s.  Returns True
        once the destination accepted and its received bitmap is applied."""
        deadline = time.monotonic() + self.opts.recovery_timeout_s
        delay = 0.2
        assert self._running is not None
        while time.monotonic() < deadline:
            for ch in (self._main, self._urgent):
                if ch is not None:
                    ch.abort()
            try:
                await self._resume_session()
                self.stats.recoveries += 1
                if not self._running.done():
                    self._running.set_result(None)
                self.stats.downtime_s = self.stats.downtime_s or (
                    time.monotonic() - self._downtime_t0
                )
                self.emit({"event": "recovered", "recoveries": self.stats.recoveries})
                self._state_event()
                return True
            except ProtocolError as exc:
                if exc.code == "session-failed":
                    return False
                self.emit({"event": "recovery-failed", "error": str(exc)})
            except (OSError, TimeoutError, ConnectionError) as exc:
                self.emit({"event": "recovery-failed", "error": str(exc)})
            if self.session.state is MigrationState.POSTCOPY_RECOVER:
                self.session.link_lost()  # back to paused (table: recover → paused)
            self._state_event()
            self._reconnect_now.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._reconnect_now.wait()
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)
        return False

    async def _resume_session(self) -> None:
        loop = asyncio.get_running_loop()
        self._failure = loop.create_future()
        main = await self._open(ChannelRole.MAIN, resume=True)
        self._main = main
        reply = await main.next_event(self.opts.connect_timeout_s)
        self.session.handle(reply, "received")
        if isinstance(reply, Error):
            raise ProtocolError(f"recovery refused: {reply.message}", code=reply.code)
        assert isinstance(reply, ReceivedBitmap) and reply.data is not None
        received = PageBitmap.from_bytes(self.ram.total_pages, reply.data)
        # Everything the destination lacks is sent again.
        self.sent = received
        self._push_cursor = 0
        main.deliver_to(self._on_event)
        self._urgent = await self._open(ChannelRole.URGENT, resume=True)
        self._urgent.deliver_to(self._on_event)

    # -- the end -----------------------------------------------------------------------

    def _finish(self) -> None:
        assert self._main is not None
        # The destination has everything; the ack is a courtesy.
        with contextlib.suppress(ChannelClosedError, ProtocolError):
            self._send_main(CompleteAck())
        self.machine.close()  # destroys the VM and releases its memory
        self.stats.status = "completed"
        self._phase = "completed"
        self.stats.total_s = time.monotonic() - self._t0
        self._state_event()

    # -- reporting ---------------------------------------------------------------------

    def _state_event(self) -> None:
        self.stats.status = self.session.state.value
        self.emit(
            {"event": "state", "side": "source", "status": self.stats.status, "phase": self._phase}
        )

    async def _report_progress(self) -> None:
        last_t, last_bytes = time.monotonic(), 0
        while True:
            await asyncio.sleep(self.opts.progress_interval_s)
            now = time.monotonic()
            pusher = self._pusher
            moved = self.stats.transferred_bytes + (pusher.bytes_sent if pusher else 0)
            remaining = self.ram.total_pages - self.sent.count()
            self.emit(
                {
                    "event": "progress",
                    "side": "source",
                    "status": self.session.state.value,
                    "elapsed_s": round(now - self._t0, 3),
                    "transferred_bytes": moved,
                    "rate_bytes_per_s": round((moved - last_bytes) / (now - last_t)),
                    "pages_remaining": remaining,
                    "total_pages": self.ram.total_pages,
                    "requests_served": self.stats.postcopy_requests,
                }
            )
            last_t, last_bytes = now, moved
            main = self._main
            if main is None or main.closed.done():
                continue
            if self.session.state in (MigrationState.ACTIVE, MigrationState.POSTCOPY_ACTIVE):
                with contextlib.suppress(ChannelClosedError, ProtocolError):
                    self._send_main(Progress(moved, remaining))  # our heartbeat
            if (
                self.session.state in _WATCHED
                and main.silent_for(now) > self.opts.heartbeat_timeout_s
            ):
                # A black hole sends neither RST nor FIN: silence is the only sign.
                self.emit({"event": "link-silent", "seconds": round(main.silent_for(now), 1)})
                main.abort()
