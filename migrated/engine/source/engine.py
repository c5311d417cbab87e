"""The source engine: moves a running :class:`Machine` to a destination.

Phases (QEMU's words): setup → active (optional precopy rounds, source.precopy) →
switchover (pause, final pages or discards, device state, Ready, Commit:
source.switchover) → postcopy-active (urgent answers and the background push,
source.postcopy; recovery after link loss, source.recovery) → completed.

Where the VM is when something fails is the contract:

* before Commit is sent, any failure or cancel resumes the VM here, unchanged (dirty
  logging off again): :class:`MigrationAborted` (source.abort).  If the destination
  may be holding the state in doubt (``VmState`` went out), :meth:`withdraw` tells it
  later;
* after it, the VM runs on the destination and stays paused here; link loss means
  ``postcopy-paused`` and the engine reconnects for as long as it takes.  :meth:`run`
  then only returns on completion or when the operator abandons the migration.

Events from the destination arrive on the loop through :meth:`_on_event`; the phases
wait for the futures those events resolve, or for the *trouble* future (link lost,
Error received, cancel) with :meth:`until` (source.answers).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from migrated.errors import (
    LinkLost,
    MigratedError,
    MigrationAborted,
    PeerRefused,
)
from migrated.kernel import PageBitmap
from migrated.log import migration_logger
from migrated.protocol import (
    FEATURE_CHECKSUM_XXH3,
    ChannelRole,
    Complete,
    CompleteAck,
    Error,
    PageRequest,
    PrecopyRoundAck,
    Progress,
    Ready,
    ReceivedBitmap,
    Role,
    Running,
    Setup,
    SetupAck,
)
from migrated.protocol.session import Session
from migrated.protocol.state import MigrationState
from migrated.transport.channel import Channel
from migrated.transport.faults import FaultPlan
from migrated.transport.link import Link
from migrated.transport.security import Security
from migrated.vmm import Machine
from migrated.vmm.admission import OomShield

from ..options import Mode, SendOptions
from ..ram import PAGE_SIZE, GuestRam
from ..stats import MigrationStats, Pacer
from .abort import Cancelled, abort
from .answers import Answers
from .postcopy import run_postcopy, serve_request
from .precopy import SwitchRequested, run_precopy
from .push import PushCounters, PushCursor
from .recovery import withdraw
from .switchover import switch_over

__all__ = ["SourceEngine"]

Emit = Callable[[dict[str, Any]], None]
S = MigrationState


class SourceEngine:
    """One outgoing migration of ``machine`` to ``host:port``.

    ``emit`` receives progress and state events as JSON-ready dicts.  From other tasks:
    :meth:`request_switchover`, :meth:`cancel`, :meth:`recover_now`, :meth:`abandon`.
    """

    def __init__(
        self,
        machine: Machine,
        host: str,
        port: int,
        options: SendOptions,
        *,
        emit: Emit | None = None,
        security: Security | None = None,
        fault: FaultPlan | None = None,
    ) -> None:
        self.machine = machine
        self.host, self.port = host, port
        self.opts = options
        self.security = security or Security.plain()
        self.emit: Emit = emit or (lambda e: None)
        self.ram = GuestRam([(r.gpa, r.memory) for r in machine.regions])
        self.cursor = PushCursor(self.ram.total_pages)
        self.zero_scratch = PageBitmap(options.frame_pages)
        self.checksum = options.checksum
        self.session = Session(
            Role.SOURCE,
            os.urandom(16),
            features=frozenset({FEATURE_CHECKSUM_XXH3}) if options.checksum else frozenset(),
            layout=self.ram.layout,
            max_frame_payload=options.frame_pages * PAGE_SIZE,
            pages_remaining=lambda: self.cursor.remaining,
            heartbeat_interval_s=options.heartbeat_interval_s,
            silence_timeout_s=options.heartbeat_timeout_s,
            handshake_timeout_s=options.connect_timeout_s,
        )
        self.log = migration_logger(
            __name__,
            vm=machine.config.name,
            session=self.session.session_id.hex(),
            phase=lambda: self.session.state.value,
        )
        self.stats = MigrationStats(
            role="source",
            mode=options.mode.value,
            vm_name=machine.config.name,
            ram_bytes=self.ram.nbytes,
            total_pages=self.ram.total_pages,
        )
        self.dirty_log = machine.dirty_log()
        self.stale = PageBitmap(self.ram.total_pages)
        self.precopy_pacer = Pacer(options.precopy_bandwidth)
        self.postcopy_pacer = Pacer(options.postcopy_bandwidth)
        self.link: Link = None  # type: ignore[assignment]  # made in run(), on the loop
        self.fault = fault
        self.switch_requested = False
        self.bulk_refused = False
        self.paused = False  # the VM is paused here (switchover on)
        self.paused_since: float | None = None  # postcopy-paused since (monotonic)
        self.dest_bytes_received = 0
        self.downtime_t0 = 0.0
        self.commit_t = 0.0  # when Commit was written (the downtime's last source step)
        self.pusher: PushCounters | None = None
        self.sent_at_commit: PageBitmap | None = None
        #: True when a failure left the destination possibly holding our state in
        #: doubt (VmState went out, Commit did not): :meth:`withdraw` settles it.
        self.needs_withdraw = False
        self._cancel_reason: str | None = None
        self._abandon_reason: str | None = None
        self._t0 = time.monotonic()
        self.answers = Answers()
        self._retry_now: asyncio.Event | None = None

    # -- control from other tasks ------------------------------------------------------

    @property
    def state(self) -> MigrationState:
        return self.session.state

    def request_switchover(self) -> None:
        self.switch_requested = True

    def cancel(self, reason: str = "cancelled by the operator") -> bool:
        """Cancel before the commit.  Returns False when it is too late."""
        if self.session.point_of_no_return or self.state.terminal:
            return False
        self._cancel_reason = reason
        self.answers.raise_trouble(Cancelled(f"migration cancelled: {reason}"))
        return True

    def recover_now(self, host: str | None = None, port: int | None = None) -> None:
        """Retry a paused migration at once (optionally at a new address)."""
        if host is not None:
            self.host = host
        if port is not None:
            self.port = port
        if self._retry_now is not None:
            self._retry_now.set()

    def abandon(self, reason: str) -> bool:
        """Give up a paused postcopy migration (the destination is known dead); the
        caller resumes the VM here.  Returns False unless postcopy is paused."""
        if self.state not in (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER):
            return False
        self._abandon_reason = reason
        self.recover_now()
        return True

    # -- the migration -----------------------------------------------------------------

    async def run(self) -> MigrationStats:
        """Migrate; returns the statistics on completion.  Raises MigrationAborted
        (before the commit, VM resumed here; or abandoned after it)."""
        self._retry_now = asyncio.Event()
        self.answers.new_trouble()
        self.link = Link(
            self.session,
            security=self.security,
            on_event=self._on_event,
            on_lost=self._on_lost,
            fault=self.fault,
        )
        reporter = asyncio.create_task(self._report_progress(), name="migrated-progress")
        self.state_changed()  # setup
        try:
            try:
                await self._setup()
                if self.opts.mode is not Mode.POSTCOPY:
                    await run_precopy(self)
                await switch_over(self)
            except BaseException as exc:
                await abort(self, exc, self._cancel_reason)
            # Until completion this process holds the only copy of the pages the
            # destination lacks: the OOM killer must pick someone else.
            shield = OomShield()
            try:
                await run_postcopy(self)
                await self._finish()
            finally:
                shield.close()
            return self.stats
        finally:
            reporter.cancel()
            self.stats.total_s = time.monotonic() - self._t0
            self.stats.status = self.state.value
            self.link.close()

    async def _setup(self) -> None:
        t = time.monotonic()
        opts = self.opts
        await self.link.open(
            ChannelRole.MAIN, self.host, self.port, timeout_s=opts.connect_timeout_s
        )
        cfg = self.machine.config
        self.link.send_main(Setup(cfg.name, cfg.uuid, self.ram.layout, cfg.vcpus, opts.mode.value))
        await self.until(self.answers.setup_ack, timeout_s=opts.connect_timeout_s, what="SetupAck")
        await self.link.open(
            ChannelRole.URGENT, self.host, self.port, timeout_s=opts.connect_timeout_s
        )
        self.stats.setup_s = time.monotonic() - t
        self.log.info("migration to %s:%d set up (%s mode)", self.host, self.port, opts.mode.value)
        self.state_changed()

    async def withdraw(self) -> bool:
        """After an abort with :attr:`needs_withdraw`: tell the destination."""
        return await withdraw(self)

    async def _finish(self) -> None:
        try:
            self.link.send_main(CompleteAck())  # a courtesy: the destination has it all
        except MigratedError as exc:
            self.log.info("CompleteAck not sent: %s", exc)
        self.link.close()
        self.stats.status = "completed"
        self.stats.total_s = time.monotonic() - self._t0
        self.log.event("completed", "migration completed in %.3f s", self.stats.total_s)
        self.state_changed()

    # -- waiting -----------------------------------------------------------------------

    async def until(
        self, fut: asyncio.Future[Any], *, timeout_s: float | None = None, what: str = ""
    ) -> Any:
        """:meth:`Answers.until`: ``fut`` or the trouble, whichever comes first."""
        return await self.answers.until(fut, timeout_s=timeout_s, what=what)

    async def wait_for_retry(self, delay_s: float) -> None:
        assert self._retry_now is not None
        self._retry_now.clear()
        try:
            async with asyncio.timeout(delay_s):
                await self._retry_now.wait()
        except TimeoutError:
            pass

    def check_interrupts(self, *, allow_switch: bool) -> None:
        """Raise the trouble that arrived (cancel, link lost, Error), or
        SwitchRequested when the operator asked for postcopy (in precopy)."""
        trouble = self.answers.trouble()
        if trouble is not None:
            raise trouble
        if allow_switch and self.switch_requested:
            raise SwitchRequested()

    def check_abandoned(self) -> None:
        if self._abandon_reason is not None:
            self.session.table.abandon()
            raise MigrationAborted(
                f"postcopy abandoned by the operator ({self._abandon_reason}): the VM "
                "resumes here from its state at the switchover; whatever ran on the "
                "destination since is discarded"
            )

    def heard_from_destination_within(self, seconds: float) -> bool:
        main = self.link.main
        if main is None:
            return False
        return self.session.silent_for(main.conn, time.monotonic()) < seconds

    # -- events from the destination -----------------------------------------------------

    def _on_event(self, ch: Channel, event: Any) -> None:
        t = type(event)
        if t is PageRequest:
            serve_request(self, ch, event)
        elif t is Progress:
            pass  # the heartbeat: the session noted the bytes
        elif t is PrecopyRoundAck:
            self.dest_bytes_received = event.bytes_received
            self.answers.resolve("ack", event)
        elif t is SetupAck:
            self.answers.resolve("setup-ack", event)
        elif t is Ready:
            if self.state is S.POSTCOPY_RECOVER:
                self.answers.resolve("resumed", event)
            else:
                self.answers.resolve("ready", event)
        elif t is Running:
            if self.downtime_t0 and not self.stats.downtime_s:
                now = time.monotonic()
                self.stats.downtime_s = now - self.downtime_t0
                if self.commit_t:
                    steps = self.stats.downtime_breakdown_ms
                    steps["wait-running"] = round((now - self.commit_t) * 1e3, 3)
                self.event("running", downtime_ms=round(self.stats.downtime_s * 1e3, 3))
            self.answers.resolve("running", event)
        elif t is ReceivedBitmap:
            self.answers.resolve("resumed", event)
        elif t is Complete:
            self.answers.resolve("complete", event)
            # It may also be the answer to a resumed MAIN (every page had arrived):
            # recovery waits for that answer.
            self.answers.resolve("resumed", event)
        elif t is Error:
            self.answers.raise_trouble(
                PeerRefused(f"the destination reported: {event.message}", code=event.code)
            )

    def _on_lost(self, ch: Any, exc: BaseException | None) -> None:
        if getattr(ch, "name", "") == "bulk":
            return  # the push's owner sees it; MAIN's heartbeat judges the link
        reason = self.session.lost_reason or (str(exc) if exc else "the connection closed")
        if self.state in (S.FAILED, S.POSTCOPY_PAUSED, S.CANCELLED):
            self.answers.raise_trouble(LinkLost(reason))

    def link_lost(self, reason: str) -> None:
        """Postcopy: make sure every connection is down before recovering."""
        if self.state is S.POSTCOPY_ACTIVE:
            self.link.cut(reason)

    def received_bitmap(self, data: memoryview) -> PageBitmap:
        return PageBitmap.from_bytes(self.ram.total_pages, data)

    # -- reporting ---------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> None:
        self.emit({"event": kind, "side": "source", **fields})

    def state_changed(self) -> None:
        self.stats.status = self.state.value
        self.event("state", status=self.stats.status)

    async def _report_progress(self) -> None:
        last_t, last_bytes = time.monotonic(), 0
        while True:
            await asyncio.sleep(self.opts.progress_interval_s)
            now = time.monotonic()
            pusher = self.pusher
            moved = self.stats.transferred_bytes + (pusher.payload_bytes if pusher else 0)
            self.event(
                "progress",
                status=self.state.value,
                elapsed_s=round(now - self._t0, 3),
                transferred_bytes=moved,
                rate_bytes_per_s=round((moved - last_bytes) / (now - last_t)),
                pages_remaining=self.cursor.remaining,
                total_pages=self.ram.total_pages,
                requests_served=self.stats.postcopy_requests,
            )
            last_t, last_bytes = now, moved
