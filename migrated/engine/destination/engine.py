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
import socket
import time
from collections.abc import Callable
from typing import Any

from migrated.errors import MigratedError, MigrationAborted, StateError
from migrated.kernel import GuestMemory, PageBitmap
from migrated.log import MigrationLogger, migration_logger
from migrated.protocol import (
    FEATURE_CHECKSUM_CRC32,
    FEATURE_CHECKSUM_XXH3,
    AllSent,
    Cancel,
    ChannelRole,
    Commit,
    Complete,
    CompleteAck,
    Discard,
    DiscardBitmap,
    Error,
    ErrorCode,
    Hello,
    PageRequest,
    Pages,
    PrecopyRoundAck,
    PrecopyRoundEnd,
    Progress,
    Ready,
    ReceivedBitmap,
    Role,
    Running,
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
from ..ram import PAGE_SIZE, GuestRam, staging_buffer
from ..stats import MigrationStats
from .accept import Acceptor
from .bulk import BulkReceiver
from .faults import FaultService
from .installer import Installer
from .pages import PageStore, Runs
from .prefault import PreFaulter
from .restore import KVM, Backend, Prepared, prepare, start, teardown
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
        self._shield: OomShield | None = None
        self._memory: GuestMemory | None = None
        self._staging: dict[Channel, memoryview] = {}
        self._ring: dict[Channel, memoryview] = {}
        self._complete_sent = False
        self._acceptor: Acceptor | None = None
        self._done: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._t0 = self._t_switch = self._t_running = 0.0

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
        self._done = asyncio.get_running_loop().create_future()
        self._acceptor = Acceptor(
            security=self.security,
            on_hello=self._on_hello,
            max_pending=self.opts.max_pending_connections,
            handshake_timeout_s=self.opts.handshake_timeout_s,
            max_frame_nbytes=self.opts.max_frame_nbytes,
        )
        self.port = await self._acceptor.listen(self.host, self.port)
        self.emit({"event": "listening", "host": self.host, "port": self.port})
        return self.port

    async def run(self) -> Machine:
        if self._acceptor is None:
            await self.listen()
        assert self._done is not None
        reporter = asyncio.create_task(self._report_progress(), name="migrated-progress")
        try:
            await self._done
        except BaseException as exc:
            self.stats.error = str(exc)
            await self._release(
                keep_guest=self.session is not None and self.session.point_of_no_return
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
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
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
            self._fail(f"abandoned by the operator in doubt ({reason}); the state was discarded")

    # -- connections -------------------------------------------------------------------

    def _on_hello(self, ch: Channel, hello: Hello) -> None:
        if self.session is None:
            if hello.role is not ChannelRole.MAIN or hello.resume:
                ch.send(Error(ErrorCode.SESSION_UNKNOWN, "no migration session here"))
                ch.close()
                return
            self._open_session(hello)
        assert self.session is not None and self.link is not None
        session = self.session
        if hello.session_id != session.session_id:
            code = ErrorCode.BUSY if not hello.resume else ErrorCode.SESSION_UNKNOWN
            ch.send(Error(code, "this destination is receiving another migration"))
            ch.close()
            return
        if len(session.connections) >= self.opts.max_session_connections:
            ch.send(Error(ErrorCode.BUSY, "too many connections for this session"))
            ch.close()
            return
        if hello.role is ChannelRole.MAIN and hello.resume:
            self._before_resume()
        if not self.link.accept(ch, hello):
            return
        ch.conn.set_payload_sink(lambda header: self._sink(ch, header))
        if hello.role is ChannelRole.MAIN and hello.resume:
            self._answer_resume(ch)
        elif hello.role is ChannelRole.URGENT and self.faults is not None:
            self.faults.reissue()
        elif hello.role is ChannelRole.BULK:
            self._start_bulk(ch)

    def _open_session(self, hello: Hello) -> None:
        self._t0 = time.monotonic()
        self.session = Session(
            Role.DESTINATION,
            hello.session_id,
            features=_LOCAL_FEATURES,
            max_frame_payload=self.opts.max_frame_nbytes,
            pages_remaining=lambda: (
                0 if self.store is None else self.store.total_pages - self.store.count
            ),
            heartbeat_interval_s=self.opts.heartbeat_interval_s,
            silence_timeout_s=self.opts.heartbeat_timeout_s,
            handshake_timeout_s=self.opts.handshake_timeout_s,
        )
        self.link = Link(
            self.session,
            security=self.security,
            on_event=self._on_event,
            on_lost=self._on_lost,
            fault=self.fault,
        )

    def _before_resume(self) -> None:
        """A resumed MAIN: drop old connections we have not seen fail yet."""
        assert self.session is not None and self.link is not None
        state = self.session.state
        if state in (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER):
            self.link.cut("the source reconnected: the old connections are stale")
        if self.session.state is S.POSTCOPY_PAUSED:
            self.session.table.begin_recovery()

    def _answer_resume(self, ch: Channel) -> None:
        assert self.session is not None and self.store is not None
        if self.session.state is S.READY:
            ch.send(Ready())  # still waiting for the Commit
            self.log.info("the source reconnected while the state is held in doubt")
            return
        if self.store.complete and self.guest_started:
            # Everything is here: the source only needs to hear it (again).
            ch.send(Complete(self.store.count))
            if not self._complete_sent:
                self._complete_sent = True
                self._own(self._finish())
            self.log.info("the source reconnected after every page arrived: Complete")
            return
        ch.send(ReceivedBitmap(memoryview(self.store.snapshot())))
        self.stats.recoveries += 1
        self.log.event("recovered", "postcopy recovered (the source reconnected)")
        self._state_event()

    def _start_bulk(self, ch: Channel) -> None:
        """Lend a BULK connection to its receiver thread (not possible over TLS: then
        it stays on the loop and its frames go to the installer)."""
        assert self.link is not None and self.store is not None
        if ch.transport is not None and ch.transport.get_extra_info("ssl_object") is not None:
            return
        fd, conn = self.link.lend(ch)
        bc = BlockingChannel(
            socket.socket(fileno=fd), conn, self.link.session, name="bulk", idle_timeout_s=30.0
        )
        self.link.adopt_thread(bc)
        receiver = BulkReceiver(
            bc, self.store, self._after_install, max_frame_nbytes=self.opts.max_frame_nbytes
        )
        self.bulk.append(receiver)
        receiver.worker.start()
        self._own(self._watch_bulk(receiver))

    async def _watch_bulk(self, receiver: BulkReceiver) -> None:
        exc: BaseException | None = None
        try:
            await receiver.worker.join()
        except MigratedError as err:
            exc = err
            self.log.info("BULK connection ended: %s", err)
        finally:
            receiver.bc.close()
            self.stats.postcopy_bytes += receiver.normal_pages * PAGE_SIZE
            self.stats.normal_pages += receiver.normal_pages
            self.stats.zero_pages += receiver.zero_pages
            receiver.normal_pages = receiver.zero_pages = 0
            if self.link is not None:
                self.link.thread_closed(receiver.bc, exc)
            if receiver in self.bulk:
                self.bulk.remove(receiver)

    def _on_lost(self, ch: Channel | BlockingChannel, exc: BaseException | None) -> None:
        if isinstance(ch, BlockingChannel) or self.session is None:
            return
        self._staging.pop(ch, None)
        state = self.session.state
        reason = self.session.lost_reason or (str(exc) if exc else "the connection closed")
        if state is S.FAILED and not self.session.point_of_no_return:
            self._fail(f"the link to the source failed before the guest ran here: {reason}")
        elif state is S.POSTCOPY_PAUSED and ch.name in ("main", "urgent"):
            self.log.event("postcopy-paused", "postcopy paused: %s; waiting for the source", reason)
            self._state_event()
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
        self._own(self._setup(ch, s))

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
            self._fail(f"refused the incoming VM {s.vm_name!r}: {message}")
            return
        self._shield = OomShield()  # this process will hold the only copy of pages
        self._memory = GuestMemory.create(s.layout.regions[0].nbytes)
        ram = GuestRam([(s.layout.regions[0].gpa, self._memory)])
        self.store = PageStore(ram)
        self.store.reservation = reservation
        st = self.stats
        st.vm_name, st.mode, st.ram_bytes, st.total_pages = (
            s.vm_name,
            s.mode,
            ram.nbytes,
            ram.total_pages,
        )
        st.setup_s = time.monotonic() - self._t0
        if not ch.is_open:
            return  # the source went away meanwhile: the link's loss fails the session
        ch.send(SetupAck())
        self._state_event()

    def _sink(self, ch: Channel, header: Any) -> memoryview | None:
        store = self.store
        if type(header) is not Pages or store is None:
            return None
        page = store.ram.page_of_gpa(header.gpa)
        if not store.sealed:
            return store.precopy_target(page, header.npages)
        nbytes = header.npages * PAGE_SIZE
        if ch.name in ("main", "bulk"):  # the push on a connection the loop reads
            installer = self._installer()
            buf = installer.take_buffer()
            if buf is not None:
                if installer.buffers_free == 0:
                    ch.hold_reading("staging")
                self._ring[ch] = buf
                return buf[:nbytes]
        # Each channel has its own staging buffer: a payload may arrive in pieces while
        # another channel's frame completes in between.
        staging = self._staging.get(ch)
        if staging is None:
            staging = self._staging[ch] = staging_buffer(self.opts.max_frame_nbytes)
        return staging[:nbytes]

    def _installer(self) -> Installer:
        if self.installer is None:
            assert self.store is not None
            self.installer = Installer(
                self.store,
                self._after_install,
                self._buffer_free,
                nbuffers=self.opts.install_buffers,
                buffer_nbytes=self.opts.max_frame_nbytes,
            )
            self.installer.start()
        return self.installer

    def _buffer_free(self) -> None:
        for ch in list(self._ring) + ([self.link.main] if self.link and self.link.main else []):
            if isinstance(ch, Channel):
                ch.release_reading("staging")

    def _on_pages(self, ch: Channel, p: Pages) -> None:
        store = self.store
        assert store is not None and p.data is not None
        page = store.ram.page_of_gpa(p.gpa)
        self._account(p.npages * PAGE_SIZE, p.npages, zero=False)
        if not store.sealed:
            store.precopy_pages(page, p.npages)
            return
        buf = self._ring.pop(ch, None)
        if buf is not None:
            self._installer().submit(page, p.npages, p.data, buf)
        else:
            self._after_install(store.install(page, p.npages, p.data))

    def _on_zero_pages(self, ch: Channel, z: ZeroPages) -> None:
        store = self.store
        assert store is not None
        page = store.ram.page_of_gpa(z.gpa)
        self._account(0, z.npages, zero=True)
        if not store.sealed:
            store.precopy_zero(page, z.npages)
        else:
            self._after_install(store.install(page, z.npages, None))

    def _account(self, nbytes: int, npages: int, *, zero: bool) -> None:
        st = self.stats
        if zero:
            st.zero_pages += npages
        else:
            st.normal_pages += npages
        if self.state is S.ACTIVE:
            st.precopy_bytes += nbytes
        elif self.guest_started:
            st.postcopy_bytes += nbytes
        else:
            st.downtime_bytes += nbytes

    def _after_install(self, runs: Runs) -> None:
        """On the loop, after pages were newly installed (any path)."""
        if self.faults is not None:
            self.faults.installed(runs)
        if self.prefaulter is not None and self.store is not None:
            for page, n in runs:
                self.prefaulter.submit(self.store.ram.gpa_of_page(page), n * PAGE_SIZE)
        self._maybe_complete()

    def _on_discard(self, ch: Channel, d: Discard) -> None:
        assert self.store is not None
        self.stats.discarded_pages += self.store.discard(
            self.store.ram.page_of_gpa(d.gpa), d.npages
        )

    def _on_discard_bitmap(self, ch: Channel, d: DiscardBitmap) -> None:
        assert self.store is not None and d.data is not None
        stale = PageBitmap.from_bytes(self.store.total_pages, d.data)
        self.stats.discarded_pages += self.store.discard_marked(stale)

    def _on_round_end(self, ch: Channel, r: PrecopyRoundEnd) -> None:
        assert self.session is not None
        self.stats.precopy_rounds = r.round
        self.stats.dirty_pages_per_round.append(r.dirty_pages)
        ch.send(PrecopyRoundAck(r.round, self.session.payload_bytes))
        self.emit({"event": "precopy-round", "round": r.round, "dirty_pages": r.dirty_pages})

    def _on_switchover(self, ch: Channel, s: Switchover) -> None:
        self._t_switch = time.monotonic()
        self.stats.precopy_s = self._t_switch - self._t0 - self.stats.setup_s
        self._state_event()

    def _on_vm_state(self, ch: Channel, v: VmState) -> None:
        assert v.data is not None
        self._own(self._prepare(bytes(v.data)))

    async def _prepare(self, state_bytes: bytes) -> None:
        assert self.store is not None and self._memory is not None and self.link is not None
        try:
            self.prepared = await prepare(
                state_bytes,
                self._memory,
                self.store,
                backend=self.backend,
                console=self.opts.console,
                steps=self.stats.downtime_breakdown_ms,
            )
        except MigratedError as exc:
            code = getattr(exc, "code", ErrorCode.RESTORE_FAILED)
            self.log.error("cannot restore the VM: %s", exc)
            with contextlib.suppress(MigratedError):  # gone too: the source resumes anyway
                self.link.send_main(Error(code, f"destination: {exc}"[:4000]))
            self._fail(f"could not restore the VM here: {exc}")
            return
        self._memory = None  # the machine owns it now
        if self.state is not S.DEVICE:
            return  # the session ended meanwhile: _release tears it down
        self.link.send_main(Ready())
        self.log.info("holding the complete VM state; Ready sent, waiting for Commit")
        self._state_event()

    def _on_commit(self, ch: Channel, c: Commit) -> None:
        self._own(self._run_guest())

    async def _run_guest(self) -> None:
        assert self.prepared is not None and self.store is not None and self.link is not None
        uffd = self.prepared.uffd
        if uffd is not None:
            self.faults = FaultService(
                self.store, uffd, self.stats, self._send_request, self._fault_failure
            )
            self.faults.start()
        tids = await start(self.prepared)
        if self.faults is not None:
            self.faults.tid_to_vcpu = tids
        self.guest_started = True
        self._t_running = time.monotonic()
        self.stats.downtime_s = self._t_running - (self._t_switch or self._t_running)
        self.log.event("switchover", "the guest runs here (Commit received)")
        try:
            self.link.send_main(Running())
        except MigratedError as exc:
            self.log.info("Running not sent: %s", exc)
        self._state_event()
        if self.opts.prefault:
            self.prefaulter = PreFaulter(self.prepared.machine)
            page, _ = self.store.received.find_run(0, True)
            self.prefaulter.start(None if page < 0 else self.store.ram.gpa_of_page(page))
        self._maybe_complete()

    def _send_request(self, req: PageRequest) -> bool:
        link = self.link
        if link is None or self.state is not S.POSTCOPY_ACTIVE:
            return False
        ch = link.urgent or link.main
        if ch is None:
            return False
        try:
            ch.send(req)
        except MigratedError:
            return False
        return True

    def _fault_failure(self, exc: BaseException) -> None:
        self.stats.error = f"fault service failed: {exc}"
        self.log.error("%s", self.stats.error)
        self._state_event()

    def _on_all_sent(self, ch: Channel, a: AllSent) -> None:
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        store, link = self.store, self.link
        if self._complete_sent or store is None or link is None or not self.guest_started:
            return
        if not store.complete or self.state is not S.POSTCOPY_ACTIVE or link.main is None:
            return
        link.send_main(Complete(store.count))  # the destination's part is done
        self._complete_sent = True
        self._own(self._finish())

    def _on_complete_ack(self, ch: Channel, a: CompleteAck) -> None:
        self.log.info("the source released its copy of the VM")

    async def _finish(self) -> None:
        await self._release(keep_guest=True)
        now = time.monotonic()
        self.stats.postcopy_s = now - self._t_running
        self.stats.total_s = now - self._t0
        self.log.event("completed", "migration completed in %.3f s", self.stats.total_s)
        self._state_event()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _on_cancel(self, ch: Channel, c: Cancel) -> None:
        self._fail(f"the source cancelled the migration: {c.reason}")

    def _on_error(self, ch: Channel, e: Error) -> None:
        state = self.state
        if state is S.FAILED:
            self._fail(f"the source failed: {e.message}")
        else:
            self.log.warning("the source reported: %s (state %s)", e.message, state.value)
            self._state_event()

    # -- ending --------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        self.log.event("failed", "incoming migration failed: %s", reason)
        if self._done is not None and not self._done.done():
            self._done.set_exception(
                MigrationAborted(f"incoming migration failed: {reason}; the VM is the source's")
            )

    async def _release(self, *, keep_guest: bool) -> None:
        """Stop and join every thread, close userfaultfd; without ``keep_guest`` also
        destroy the VM and its memory (the guest never ran here)."""
        for receiver in list(self.bulk):
            receiver.worker.stop()
            try:
                await receiver.worker.join()
            except MigratedError as exc:
                self.log.info("BULK receiver ended: %s", exc)
        if self.installer is not None:
            await self.installer.close()
            self.installer = None
        if self.faults is not None:
            self.faults.stop()
            self.faults = None
        if self.prefaulter is not None:
            self.stats.prefault = self.prefaulter.report()
            await self.prefaulter.close()
            self.prefaulter = None
        if self.store is not None:
            self.stats.install_s = self.store.install_s
            self.stats.duplicate_pages = self.store.duplicate_pages
            if self.store.reservation is not None:
                self.store.reservation.close()
                self.store.reservation = None
        if self._shield is not None:
            self._shield.close()  # complete here, or never ran here: no longer the only copy
            self._shield = None
        prepared = self.prepared
        if keep_guest and prepared is not None:
            if prepared.uffd is not None:
                for r in prepared.machine.regions:
                    prepared.uffd.unregister(r.memory.address, r.memory.nbytes)
                prepared.uffd.close()
                prepared.uffd = None
            return
        self.prepared = None
        await teardown(prepared, self._memory)
        self._memory = None

    def _own(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                self.log.error("destination task failed: %s", exc, exc_info=exc)
                self._fail(f"internal error: {exc}")

        task.add_done_callback(done)

    # -- reporting ---------------------------------------------------------------------

    def _state_event(self) -> None:
        self.stats.status = self.state.value
        self.emit({"event": "state", "side": "destination", "status": self.stats.status})

    async def _report_progress(self) -> None:
        while True:
            await asyncio.sleep(self.opts.progress_interval_s)
            store = self.store
            if store is None or self.session is None:
                continue
            self.emit(
                {
                    "event": "progress",
                    "side": "destination",
                    "status": self.state.value,
                    "elapsed_s": round(time.monotonic() - self._t0, 3),
                    "transferred_bytes": self.session.payload_bytes,
                    "pages_installed": store.count,
                    "total_pages": store.total_pages,
                    "faults": self.stats.postcopy_requests,
                }
            )


_HANDLERS: dict[type, Callable[[DestinationEngine, Channel, Any], None]] = {
    Setup: DestinationEngine._on_setup,
    Pages: DestinationEngine._on_pages,
    ZeroPages: DestinationEngine._on_zero_pages,
    Discard: DestinationEngine._on_discard,
    DiscardBitmap: DestinationEngine._on_discard_bitmap,
    PrecopyRoundEnd: DestinationEngine._on_round_end,
    Switchover: DestinationEngine._on_switchover,
    VmState: DestinationEngine._on_vm_state,
    Commit: DestinationEngine._on_commit,
    AllSent: DestinationEngine._on_all_sent,
    CompleteAck: DestinationEngine._on_complete_ack,
    Cancel: DestinationEngine._on_cancel,
    Error: DestinationEngine._on_error,
    Progress: lambda eng, ch, e: None,
}
