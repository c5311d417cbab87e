"""The destination engine: receives a VM and runs it before its memory has arrived.

The data path, by module: connections are accepted under limits (``accept``); every
page, whatever channel it came on, goes through the ``PageStore`` (``pages``), on the
loop for precopy and urgent answers, on the BULK receiver thread (``bulk``) or the
installer thread (``installer``) for the background push; ``VmState`` is restored into
a VM that is not started (``restore``) and answered with ``Ready``; ``Commit`` starts
the vCPUs, faults are served from then on (``faults``) and KVM_PRE_FAULT_MEMORY warms
what was installed (``prefault``).

Where the VM is, by state: before ``Ready`` the source keeps it, and any failure here
tears everything down (:class:`MigrationAborted`); in ``ready`` the state is held, in
doubt, until ``Commit``, ``Cancel`` or the operator decides; after ``Commit`` the VM
runs here, and a lost link pauses postcopy until the source reconnects, for as long
as it takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from migrated.errors import MigratedError, MigrationAborted, StateError
from migrated.kernel import GuestMemory
from migrated.log import MigrationLogger, migration_logger
from migrated.protocol import (
    FEATURE_CHECKSUM_CRC32,
    FEATURE_CHECKSUM_XXH3,
    AllSent,
    Cancel,
    Commit,
    CompleteAck,
    Discard,
    DiscardBitmap,
    Error,
    Pages,
    PrecopyRoundEnd,
    Progress,
    Setup,
    SetupAck,
    Switchover,
    VmState,
    ZeroPages,
)
from migrated.protocol.session import Session
from migrated.protocol.state import MigrationState
from migrated.transport.blocking import BlockingChannel
from migrated.transport.channel import Channel
from migrated.transport.faults import FaultPlan
from migrated.transport.link import Link
from migrated.transport.security import Security
from migrated.vmm import Machine
from migrated.vmm.admission import OomShield

from ..options import RecvOptions
from ..ram import GuestRam
from ..stats import MigrationStats
from . import accept, guest, receive
from .accept import Acceptor
from .bulk import BulkReceiver
from .faults import FaultService
from .installer import Installer
from .pages import PageStore
from .prefault import PreFaulter
from .restore import KVM, Backend, Prepared, prebuild
from .setup import Admit, admit_memory, check_setup, default_admission

__all__ = ["DestinationEngine"]

Emit = Callable[[dict[str, Any]], None]
S = MigrationState
_LOCAL_FEATURES = frozenset({FEATURE_CHECKSUM_XXH3, FEATURE_CHECKSUM_CRC32})
log = logging.getLogger(__name__)


class DestinationEngine:
    """Accepts one incoming migration on ``host:port``.  :meth:`run` returns the running
    :class:`Machine` once every page is installed (the caller keeps it running), or
    raises :class:`MigrationAborted` when the migration ended before the guest ran
    here (the VM is still on the source).  ``admit(ram_bytes)`` raises
    InsufficientMemory when this host cannot hold the guest."""

    def __init__(
        self,
        host: str,
        port: int,
        options: RecvOptions | None = None,
        *,
        emit: Emit | None = None,
        security: Security | None = None,
        fault: FaultPlan | None = None,
        admit: Admit | None = None,
        backend: Backend = KVM,
    ) -> None:
        self.host, self.port = host, port
        self.opts = options or RecvOptions()
        self.emit: Emit = emit or (lambda e: None)
        self.security = security or Security.plain()
        self.fault = fault
        self.admit = admit
        self.backend = backend
        self.stats = MigrationStats(role="destination")
        self.session: Session | None = None
        self.link: Link | None = None
        self.log: MigrationLogger = migration_logger(
            __name__, vm="", session="", phase=lambda: self.state.value
        )
        self.store: PageStore | None = None
        self.prepared: Prepared | None = None
        self.faults: FaultService | None = None
        self.installer: Installer | None = None
        self.bulk: list[BulkReceiver] = []
        self.prefaulter: PreFaulter | None = None
        self.guest_started = False
        self.all_sent = False
        self.last_sweep = 0.0
        self.shield: OomShield | None = None
        self.memory: GuestMemory | None = None
        #: KVM VM, slot and vCPUs built at Setup for the restore to adopt (vmm.shell)
        self.shell: Any = None
        self.staging: dict[Channel, memoryview] = {}
        self.ring: dict[Channel, memoryview] = {}
        #: Channels whose reading waits for a free staging buffer (see receive.sink).
        self.staging_held: set[Channel] = set()
        self.complete_sent = False
        self.acceptor: Acceptor | None = None
        self.done: asyncio.Future[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.t0 = self.t_switch = self.t_running = 0.0
        self.t_ready = 0.0  # Ready sent: the wait for Commit starts

    # -- public ------------------------------------------------------------------------

    @property
    def state(self) -> MigrationState:
        return self.session.state if self.session is not None else S.SETUP

    @property
    def machine(self) -> Machine | None:
        """The VM, from the moment its vCPUs run here."""
        return self.prepared.machine if self.prepared is not None and self.guest_started else None

    async def listen(self) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        self.done = asyncio.get_running_loop().create_future()
        self.acceptor = Acceptor(
            security=self.security,
            on_hello=partial(accept.on_hello, self),
            max_pending=self.opts.max_pending_connections,
            handshake_timeout_s=self.opts.handshake_timeout_s,
            max_frame_nbytes=self.opts.max_frame_nbytes,
        )
        self.port = await self.acceptor.listen(self.host, self.port)
        self.emit({"event": "listening", "host": self.host, "port": self.port})
        return self.port

    async def run(self) -> Machine:
        if self.acceptor is None:
            await self.listen()
        assert self.done is not None
        reporter = asyncio.create_task(self._report_progress(), name="migrated-progress")
        try:
            await self.done
        except BaseException as exc:
            self.stats.error = str(exc)
            await guest.release(
                self, keep_guest=self.session is not None and self.session.point_of_no_return
            )
            await self.close()
            raise
        finally:
            reporter.cancel()
            self.stats.status = self.state.value
        # The port stays open until close(): a source that missed our Complete (the
        # link broke) reconnects and is told again (docs/protocol.md §7).
        assert self.prepared is not None
        return self.prepared.machine

    async def close(self) -> None:
        """Stop listening, close every connection, wait for our tasks (idempotent)."""
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
        if self.link is not None:
            self.link.close()

    def abandon(self, reason: str) -> None:
        """The operator gives up a session in doubt (``ready``: the source keeps the
        VM) or paused.  In ``ready`` the received state is discarded."""
        if self.session is None or self.state not in (
            S.READY,
            S.POSTCOPY_PAUSED,
            S.POSTCOPY_RECOVER,
        ):
            raise StateError(f"nothing to abandon in state {self.state.value}")
        in_doubt = self.state is S.READY
        self.session.table.abandon()
        self.log.warning("migration abandoned by the operator: %s", reason)
        if in_doubt:
            self.fail(f"abandoned by the operator in doubt ({reason}); the state was discarded")

    # -- connections -------------------------------------------------------------------

    def _on_lost(self, ch: Channel | BlockingChannel, exc: BaseException | None) -> None:
        if isinstance(ch, BlockingChannel) or self.session is None:
            return
        self.staging.pop(ch, None)
        state = self.session.state
        reason = self.session.lost_reason or (str(exc) if exc else "the connection closed")
        if state is S.FAILED and not self.session.point_of_no_return:
            self.fail(f"the link to the source failed before the guest ran here: {reason}")
        elif state is S.POSTCOPY_PAUSED and ch.name in ("main", "urgent"):
            self.log.event("postcopy-paused", "postcopy paused: %s; waiting for the source", reason)
            self.state_event()
        elif state is S.READY and ch.name == "main":
            self.log.warning(
                "link lost while holding the VM state in doubt (%s): waiting for the source to "
                "commit or cancel; if the source runs the VM, `migrated cancel --force` drops it",
                reason,
            )

    # -- events ------------------------------------------------------------------------

    def _on_event(self, ch: Channel, event: Any) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, ch, event)

    def _on_setup(self, ch: Channel, s: Setup) -> None:
        assert self.session is not None
        self.log = migration_logger(
            __name__,
            vm=s.vm_name,
            session=self.session.session_id.hex(),
            phase=lambda: self.state.value,
        )
        self.own(self._setup(ch, s))

    async def _setup(self, ch: Channel, s: Setup) -> None:
        refusal = check_setup(s, self.opts)
        reservation = None
        if refusal is None:
            admit = self.admit or default_admission(s.vm_name, self.opts)
            reservation, refusal = await admit_memory(s, self.opts, admit)
        if refusal is not None:
            code, message = refusal
            self.log.warning("refused the incoming VM: %s", message)
            with contextlib.suppress(MigratedError):  # gone already: it fails either way
                ch.send(Error(code, message))
            ch.close()
            self.fail(f"refused the incoming VM {s.vm_name!r}: {message}")
            return
        self.shield = OomShield()  # this process will hold the only copy of pages
        self.memory = GuestMemory.create(s.layout.regions[0].nbytes)
        # The KVM VM, slot and vCPUs now rather than in the downtime (vmm.shell).
        try:
            self.shell = await prebuild(self.backend, self.memory, s.vcpu_count)
        except (OSError, MigratedError) as exc:
            self.log.warning("could not create the KVM VM ahead (%s): at VmState", exc)
        if self.done is not None and self.done.done() and self.shell is not None:
            self.shell.close()  # ended meanwhile, after release
        ram = GuestRam([(s.layout.regions[0].gpa, self.memory)])
        self.store = PageStore(ram, self.backend.new_pagemap)
        self.store.reservation = reservation
        st = self.stats
        st.vm_name, st.mode, st.ram_bytes, st.total_pages = (
            s.vm_name,
            s.mode,
            ram.nbytes,
            ram.total_pages,
        )
        st.setup_s = time.monotonic() - self.t0
        if not ch.is_open:
            return  # the source went away meanwhile: the link's loss fails the session
        ch.send(SetupAck())
        self.state_event()

    def _on_cancel(self, ch: Channel, c: Cancel) -> None:
        self.fail(f"the source cancelled the migration: {c.reason}")

    def _on_error(self, ch: Channel, e: Error) -> None:
        state = self.state
        if state is S.FAILED:
            self.fail(f"the source failed: {e.message}")
        else:
            self.log.warning("the source reported: %s (state %s)", e.message, state.value)
            self.state_event()

    # -- ending --------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """End an incoming migration that failed before the guest ran here.  After the
        commit nothing ends it: the guest runs here, and tearing down would lose the
        VM; the failure is logged and shown in the status, and postcopy goes on (or
        waits for the source) as the link allows."""
        if self.session is not None and self.session.point_of_no_return:
            self.stats.error = reason
            self.log.error(
                "%s; the guest keeps running here (the migration was committed), this process "
                "must not be stopped until the migration completes",
                reason,
            )
            self.state_event()
            return
        self.log.event("failed", "incoming migration failed: %s", reason)
        if self.done is not None and not self.done.done():
            self.done.set_exception(
                MigrationAborted(f"incoming migration failed: {reason}; the VM is the source's")
            )

    def own(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                self.log.error("destination task failed: %s", exc, exc_info=exc)
                self.fail(f"internal error: {exc}")

        task.add_done_callback(done)

    # -- reporting ---------------------------------------------------------------------

    def state_event(self) -> None:
        self.stats.status = self.state.value
        self.emit({"event": "state", "side": "destination", "status": self.stats.status})

    async def _report_progress(self) -> None:
        while True:
            await asyncio.sleep(self.opts.progress_interval_s)
            store = self.store
            if store is None or self.session is None:
                continue
            if self.guest_started and not self.complete_sent:
                if store.all_arrived():
                    guest.maybe_complete(self, force=True)
                else:
                    guest.sweep_if_stuck(self)
            self.emit(
                {
                    "event": "progress",
                    "side": "destination",
                    "status": self.state.value,
                    "elapsed_s": round(time.monotonic() - self.t0, 3),
                    "transferred_bytes": self.session.payload_bytes,
                    "pages_installed": store.count,
                    "total_pages": store.total_pages,
                    "faults": self.stats.postcopy_requests,
                }
            )


_HANDLERS: dict[type, Callable[[DestinationEngine, Channel, Any], None]] = {
    Setup: DestinationEngine._on_setup,
    Pages: receive.on_pages,
    ZeroPages: receive.on_zero_pages,
    Discard: receive.on_discard,
    DiscardBitmap: receive.on_discard_bitmap,
    PrecopyRoundEnd: receive.on_round_end,
    Switchover: guest.on_switchover,
    VmState: guest.on_vm_state,
    Commit: guest.on_commit,
    AllSent: guest.on_all_sent,
    CompleteAck: guest.on_complete_ack,
    Cancel: DestinationEngine._on_cancel,
    Error: DestinationEngine._on_error,
    Progress: lambda eng, ch, e: None,
}
