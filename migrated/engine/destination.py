"""The destination engine: receives a VM and runs it before its memory has arrived.

Facts we rely on (see also migrated.kernel.uffd):

* Before the guest runs, nothing is registered with userfaultfd, so precopy pages are
  received straight into guest RAM (the payload sink hands the socket the guest
  pages themselves) and zero runs are dropped with MADV_DONTNEED.
* At ``VmState`` all guest RAM is registered (MISSING mode) *before* any vCPU runs.
  From then on guest RAM is written only by the kernel: UFFDIO_COPY from a staging
  buffer, UFFDIO_ZEROPAGE for zero runs.  This thread (the event loop) never reads or
  writes guest RAM after registration; a page it touched while missing would block
  the loop that is supposed to install it.
* The received bitmap is the single source of truth: a bit is set exactly when the
  page's current content is in place.  A fault on a page whose bit is set is a race
  with an install that already woke the vCPU; we wake the range again to be sure.
* Every range on the wire was checked against the layout by the protocol
  connection before its event or payload reached us; :class:`GuestRam` checks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from migrated.errors import MigrationAborted, ProtocolError, RemoteProtocolError
from migrated.kernel import GuestMemory, PageBitmap, UffdEventKind, UffdFeature, Userfaultfd
from migrated.protocol import (
    FEATURE_CHECKSUM_CRC32,
    FEATURE_CHECKSUM_XXH3,
    AllSent,
    Cancel,
    ChannelRole,
    Complete,
    CompleteAck,
    Discard,
    DiscardBitmap,
    Error,
    ErrorCode,
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
    ZeroPages,
    negotiate,
)
from migrated.protocol.connection import Connection
from migrated.protocol.state import MigrationState, SessionState
from migrated.vmm.machine import Machine
from migrated.vmm.state import VmState as MachineState

from .bulk import BulkReceiver
from .channel import Channel
from .installer import PageInstaller
from .prefault import PreFaulter
from .ram import PAGE_SIZE, GuestRam, staging_buffer
from .stats import MigrationStats, StepTimer

__all__ = ["DestinationEngine", "RecvOptions"]

Emit = Callable[[dict[str, Any]], None]
_LOCAL_FEATURES = frozenset({FEATURE_CHECKSUM_XXH3, FEATURE_CHECKSUM_CRC32})


@dataclass(frozen=True)
class RecvOptions:
    max_ram_bytes: int = 64 << 30
    max_vcpus: int = 8
    max_frame_nbytes: int = 4 << 20
    #: staging buffers for bulk frames being installed by the installer thread
    install_buffers: int = 6
    console: str | None = None
    prefault: bool = True
    progress_interval_s: float = 0.25
    #: a MAIN channel silent this long is declared dead (both sides send heartbeats)
    heartbeat_timeout_s: float = 5.0


@dataclass
class _Pending:
    """One outstanding page request (per requested page, never per guest page)."""

    request_id: int
    t0: float
    waiters: list[tuple[int, float]] = field(default_factory=list)  # (thread id, since)


class DestinationEngine:
    """Accepts one incoming migration on ``host:port``.  :meth:`run` returns the
    running :class:`Machine` once every page is installed (the caller keeps it running),
    or raises :class:`MigrationAborted` when the migration failed before the guest ran
    here (the VM is still on the source)."""

    def __init__(
        self, host: str, port: int, options: RecvOptions | None = None, emit: Emit | None = None
    ) -> None:
        self.host, self.port = host, port
        self.opts = options or RecvOptions()
        self.emit: Emit = emit or (lambda e: None)
        self.session = SessionState(Role.DESTINATION)
        self.stats = MigrationStats(role="destination")
        self.machine: Machine | None = None
        self.ram: GuestRam | None = None
        self.received = PageBitmap(0)
        self.zero = PageBitmap(0)
        self.installed = 0
        self.uffd: Userfaultfd | None = None
        self.installer: PageInstaller | None = None
        self._bulk: BulkReceiver | None = None
        self._bulk_buf: dict[Channel, memoryview] = {}
        self.prefaulter: PreFaulter | None = None
        self._session_id: bytes | None = None
        self._main: Channel | None = None
        self._urgent: Channel | None = None
        self._channels: set[Channel] = set()
        self._pending: dict[int, _Pending] = {}
        self._next_request_id = 1
        self._tid_to_vcpu: dict[int, int] = {}
        self._staging: dict[Channel, memoryview] = {}
        self._server: asyncio.Server | None = None
        self._done: asyncio.Future[None] | None = None
        self._complete_sent = False
        self._all_sent = False
        self._t0 = 0.0
        self._t_switch = 0.0
        self._t_running = 0.0
        self._memories: list[GuestMemory] = []

    # -- listening ---------------------------------------------------------------------

    async def listen(self) -> int:
        """Start listening; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._server = await loop.create_server(
            self._new_channel, self.host, self.port, reuse_address=True
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self.emit({"event": "listening", "host": self.host, "port": self.port})
        return self.port

    def _new_channel(self) -> Channel:
        conn = Connection(Role.DESTINATION, None, max_frame_payload=self.opts.max_frame_nbytes)
        ch = Channel(conn, name="incoming", bulk=True, one_read_per_iteration=True)
        conn.set_payload_sink(lambda header: self._sink(ch, header))
        ch.deliver_to(self._on_event)
        self._channels.add(ch)
        ch.closed.add_done_callback(lambda fut: self._on_channel_closed(ch, fut))
        return ch

    async def run(self) -> Machine:
        if self._server is None:
            await self.listen()
        assert self._done is not None
        reporter = asyncio.create_task(self._report_progress())
        try:
            await self._done
        except BaseException as exc:
            self.stats.error = str(exc)
            self.stats.status = self.session.state.value
            if not self.session.point_of_no_return:
                self._teardown_failed()
            raise
        finally:
            reporter.cancel()
            if self._server is not None:
                self._server.close()
            for ch in list(self._channels):
                ch.close()
        assert self.machine is not None
        return self.machine

    def _fail(self, exc: BaseException) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)

    # -- connection events -------------------------------------------------------------

    def _on_event(self, ch: Channel, event: Any) -> None:
        try:
            if isinstance(event, Hello):
                self._on_hello(ch, event)
                return
            if ch.conn.channel is None:
                raise RemoteProtocolError("connection spoke before Hello")
            if isinstance(event, Progress):
                return
            self.session.handle(event, "received", channel=ch.conn.channel)
            handler = self._handlers.get(type(event))
            if handler is None:
                raise RemoteProtocolError(f"unexpected {type(event).__name__}")
            handler(self, ch, event)
        except ProtocolError as exc:
            self._protocol_failure(ch, exc)
        except Exception as exc:  # our own failure: tell the peer, then fail the run
            self._protocol_failure(ch, exc)

    def _protocol_failure(self, ch: Channel, exc: BaseException) -> None:
        code = getattr(exc, "code", ErrorCode.INTERNAL)
        with contextlib.suppress(Exception):
            err = Error(code, f"destination: {exc}"[:4000])
            self.session.handle(err, "sent")
            ch.send(err)
        ch.close()
        if self.session.point_of_no_return:
            self.emit({"event": "error", "error": str(exc)})
            self._state_event()
        else:
            self._fail(MigrationAborted(f"incoming migration failed: {exc}"))

    def _on_hello(self, ch: Channel, hello: Hello) -> None:
        if ch.conn.channel is not None and ch.conn.channel is not hello.role:
            raise RemoteProtocolError("a second Hello on one connection")
        fresh_main = hello.role is ChannelRole.MAIN and not hello.resume
        if fresh_main and self._session_id is None:
            self._session_id = hello.session_id
            self._t0 = time.monotonic()
        elif hello.session_id != self._session_id:
            self._refuse(
                ch, ErrorCode.SESSION_UNKNOWN, "this destination serves another migration session"
            )
            return
        elif fresh_main:
            self._refuse(ch, ErrorCode.UNEXPECTED, "a migration is already in progress here")
            return
        if hello.resume and not self.session.point_of_no_return:
            self._refuse(
                ch, ErrorCode.SESSION_FAILED, "the guest never ran here; resume it on the source"
            )
            return
        if (
            hello.resume
            and self.session.state is MigrationState.POSTCOPY_ACTIVE
            and hello.role is ChannelRole.MAIN
        ):
            # The source saw a failure we did not see yet: drop the old channels.
            self.session.link_lost()
            for old in (self._main, self._urgent):
                if old is not None:
                    old.abort()
        if hello.role is ChannelRole.BULK and (self.installer is None or self.ram is None):
            self._refuse(
                ch, ErrorCode.UNEXPECTED, "a BULK connection is accepted once the guest runs here"
            )
            return
        self.session.handle(hello, "received", channel=hello.role)
        welcome = negotiate(hello, _LOCAL_FEATURES)
        self.session.handle(welcome, "sent", channel=hello.role)
        ch.send(welcome)
        ch.name = hello.role.name.lower()
        if hello.role is ChannelRole.MAIN:
            self._main = ch
            if hello.resume:
                assert self.ram is not None
                ch.conn.set_layout(self.ram.layout)
                if self.installer is not None:
                    with self.installer.lock:  # the installer thread may be setting bits
                        snapshot = bytes(self.received.data)
                else:
                    snapshot = bytes(self.received.data)
                bitmap = ReceivedBitmap(memoryview(snapshot))
                self.session.handle(bitmap, "sent")
                ch.send(bitmap)
                self.stats.recoveries += 1
                self.emit({"event": "recovered", "recoveries": self.stats.recoveries})
                self._state_event()
        else:
            if self.ram is None:
                raise RemoteProtocolError("a page channel opened before Setup")
            ch.conn.set_layout(self.ram.layout)
            if hello.role is ChannelRole.URGENT:
                self._urgent = ch
                self._reissue_requests()
            elif hello.role is ChannelRole.BULK:
                self._start_bulk(ch)

    def _start_bulk(self, ch: Channel) -> None:
        """Hand a BULK connection to its receiver thread (see engine.bulk)."""
        assert self.installer is not None and self.ram is not None and ch.transport
        if self._bulk is not None:
            self._bulk.stop()  # a new push replaces an old one (after recovery)
            self._merge_bulk_stats()
        fd = ch.detach()
        self._bulk = BulkReceiver(
            fd,
            ch.conn,
            self.installer,
            self.ram,
            self.opts.max_frame_nbytes,
            self._after_install,
            self._bulk_closed,
        )
        # Start once the callback we are in has unwound (the channel's drain loop).
        asyncio.get_running_loop().call_soon(self._bulk.start)

    def _bulk_closed(self, exc: BaseException | None) -> None:
        if exc is not None and not self.session.state.terminal:
            self.emit({"event": "bulk-closed", "reason": str(exc)})

    def _merge_bulk_stats(self) -> None:
        b = self._bulk
        if b is not None:
            self.stats.postcopy_bytes += b.normal_pages * PAGE_SIZE
            self.stats.normal_pages += b.normal_pages
            self.stats.zero_pages += b.zero_pages
            b.normal_pages = b.zero_pages = 0

    def _refuse(self, ch: Channel, code: str, message: str) -> None:
        with contextlib.suppress(Exception):
            ch.send(Error(code, message))
        ch.close()

    def _on_channel_closed(self, ch: Channel, fut: asyncio.Future[None]) -> None:
        self._channels.discard(ch)
        self._staging.pop(ch, None)
        exc = None if fut.cancelled() else fut.exception()
        if ch not in (self._main, self._urgent):
            return
        state = self.session.state
        if state.terminal or state is MigrationState.POSTCOPY_PAUSED:
            return
        if state is MigrationState.POSTCOPY_RECOVER and ch is not self._main:
            return
        self.session.link_lost()
        cause = str(exc) if exc is not None else "closed"
        self.emit({"event": "link-lost", "channel": ch.name, "reason": cause})
        self._state_event()
        if not self.session.point_of_no_return:
            self._fail(
                MigrationAborted(
                    f"the {ch.name} connection to the source failed before the guest ran here: "
                    f"{cause}"
                )
            )

    # -- message handlers --------------------------------------------------------------

    def _on_setup(self, ch: Channel, s: Setup) -> None:
        ram_bytes = sum(r.nbytes for r in s.layout.regions)
        problems = []
        if ram_bytes > self.opts.max_ram_bytes:
            problems.append(
                f"{ram_bytes} bytes of RAM exceed this host's limit of {self.opts.max_ram_bytes}"
            )
        if not 1 <= s.vcpu_count <= self.opts.max_vcpus:
            problems.append(f"{s.vcpu_count} vCPUs (this host runs 1..{self.opts.max_vcpus})")
        if len(s.layout.regions) != 1 or s.layout.regions[0].gpa != 0:
            problems.append("only one RAM region at GPA 0 is supported")
        if any(r.page_size != PAGE_SIZE for r in s.layout.regions):
            problems.append("only 4 KiB pages are supported (both sides must agree)")
        if problems:
            raise RemoteProtocolError(
                "cannot host this VM: " + "; ".join(problems), code="unsupported-vm"
            )
        self._memories = [GuestMemory.create(r.nbytes) for r in s.layout.regions]
        self.ram = GuestRam(
            [(r.gpa, m) for r, m in zip(s.layout.regions, self._memories, strict=True)]
        )
        self.received = PageBitmap(self.ram.total_pages)
        self.zero = PageBitmap(self.ram.total_pages)
        self.stats.vm_name = s.vm_name
        self.stats.mode = s.mode
        self.stats.ram_bytes = self.ram.nbytes
        self.stats.total_pages = self.ram.total_pages
        self.stats.setup_s = time.monotonic() - self._t0
        ack = SetupAck()
        self.session.handle(ack, "sent")
        ch.send(ack)
        self._state_event()

    def _sink(self, ch: Channel, header: Any) -> memoryview | None:
        if not isinstance(header, Pages) or self.ram is None:
            return None
        page = self.ram.page_of_gpa(header.gpa)
        if self.uffd is None and not self.session.point_of_no_return:
            return self.ram.view(page, header.npages)  # not registered: write in place
        nbytes = header.npages * PAGE_SIZE
        if self.installer is not None and ch is self._main:
            buf = self.installer.take_buffer()
            if buf is not None:
                if self.installer.buffers_free == 0:
                    ch.hold_reading("staging")  # released when a buffer comes back
                self._bulk_buf[ch] = buf
                return buf[:nbytes]
        # Each channel has its own staging buffer: a payload may arrive in pieces while
        # another channel's frame completes in between.
        staging = self._staging.get(ch)
        if staging is None:
            staging = self._staging[ch] = staging_buffer(self.opts.max_frame_nbytes)
        return staging[:nbytes]

    def _on_pages(self, ch: Channel, p: Pages) -> None:
        assert self.ram is not None and p.data is not None
        page = self.ram.page_of_gpa(p.gpa)
        nbytes = p.npages * PAGE_SIZE
        self._account(nbytes, p.npages, zero=False)
        if self.installer is None:
            self.zero.clear(page, p.npages)
            self.installed += self._mark(page, p.npages)
            return
        buf = self._bulk_buf.pop(ch, None)
        if buf is not None:
            self.installer.submit(page, p.npages, p.data, buf)
        else:
            self._after_install(self.installer.install(page, p.npages, p.data))

    def _on_zero_pages(self, ch: Channel, z: ZeroPages) -> None:
        assert self.ram is not None
        page = self.ram.page_of_gpa(z.gpa)
        self._account(0, z.npages, zero=True)
        if self.installer is None:
            self.ram.discard(page, z.npages)  # reads as zero; a no-op where never written
            self.zero.set(page, z.npages)
            self.installed += self._mark(page, z.npages)
            return
        self._after_install(self.installer.install(page, z.npages, None))

    def _account(self, nbytes: int, npages: int, *, zero: bool) -> None:
        if zero:
            self.stats.zero_pages += npages
        else:
            self.stats.normal_pages += npages
        if self.session.state is MigrationState.ACTIVE:
            self.stats.precopy_bytes += nbytes
        elif self.session.point_of_no_return:
            self.stats.postcopy_bytes += nbytes
        else:
            self.stats.downtime_bytes += nbytes

    def _mark(self, page: int, npages: int) -> int:
        """Set received bits; returns how many were newly set."""
        new = self._count_clear(page, npages)
        self.received.set(page, npages)
        return new

    def _after_install(self, runs: list[tuple[int, int]]) -> None:
        """On the loop, after pages were newly installed: count them, answer the faults
        waiting for them, queue them for pre-faulting, maybe complete."""
        assert self.ram is not None
        for i, n in runs:
            self.installed += n
            if self._pending:
                self._answer(i, n)
            if self.prefaulter is not None:
                self.prefaulter.submit(self.ram.gpa_of_page(i), n * PAGE_SIZE)
        self._maybe_complete()

    def _bulk_done(self, runs: list[tuple[int, int]]) -> None:
        installer = self.installer
        if installer is None:
            return
        if self._main is not None:
            self._main.release_reading("staging")
        if installer.failure is not None:
            self.emit({"event": "error", "error": f"installing pages failed: {installer.failure}"})
            self._fail(installer.failure)
            return
        self._after_install(runs)

    def _answer(self, page: int, npages: int) -> None:
        now = time.monotonic()
        for p in range(page, page + npages) if npages <= 64 else list(self._pending):
            pend = self._pending.get(p)
            if pend is None or not page <= p < page + npages:
                continue
            del self._pending[p]
            self.stats.fault_latency.record(now - pend.t0)
            for tid, since in pend.waiters:
                vcpu = self._tid_to_vcpu.get(tid, -1)
                self.stats.blocktime_s_per_vcpu[vcpu] = (
                    self.stats.blocktime_s_per_vcpu.get(vcpu, 0.0) + now - since
                )

    def _on_discard(self, ch: Channel, d: Discard) -> None:
        assert self.ram is not None
        page = self.ram.page_of_gpa(d.gpa)
        self.installed -= d.npages - self._count_clear(page, d.npages)
        self.received.clear(page, d.npages)
        self.zero.clear(page, d.npages)
        self.ram.discard(page, d.npages)
        self.stats.discarded_pages += d.npages

    def _on_discard_bitmap(self, ch: Channel, d: DiscardBitmap) -> None:
        assert self.ram is not None and d.data is not None
        stale = PageBitmap.from_bytes(self.ram.total_pages, d.data)
        before = self.received.count()
        self.received.andnot(stale)
        self.zero.andnot(stale)
        self.installed -= before - self.received.count()
        self.stats.discarded_pages += self.ram.discard_marked(stale)

    def _count_clear(self, page: int, npages: int) -> int:
        return sum(n for _, n in self.received.runs_within(page, npages, False))

    def _on_round_end(self, ch: Channel, r: PrecopyRoundEnd) -> None:
        self.stats.precopy_rounds = r.round
        self.stats.dirty_pages_per_round.append(r.dirty_pages)
        # Tell the source how far we are: it waits for this before pausing the VM, so
        # no precopy backlog of ours ends up inside the downtime.
        assert self.ram is not None
        ack = Progress(self.stats.precopy_bytes, self.ram.total_pages - self.installed)
        with contextlib.suppress(ConnectionError, ProtocolError):
            self.session.handle(ack, "sent")
            ch.send(ack)
        self.emit({"event": "precopy-round", "round": r.round, "dirty_pages": r.dirty_pages})

    def _on_switchover(self, ch: Channel, s: Switchover) -> None:
        self._t_switch = time.monotonic()
        self.stats.precopy_s = self._t_switch - self._t0 - self.stats.setup_s
        self._state_event()

    def _on_vm_state(self, ch: Channel, v: VmState) -> None:
        assert self.ram is not None and v.data is not None
        try:
            t = time.monotonic()
            state = MachineState.from_bytes(bytes(v.data))
            self.stats.downtime_breakdown_ms["parse-state"] = round((time.monotonic() - t) * 1e3, 3)
            self._start_guest(state)
        except Exception as exc:
            self._teardown_failed()
            raise RemoteProtocolError(
                f"cannot start the VM from its state: {exc}", code="restore-failed"
            ) from exc
        running = Running()
        self.session.handle(running, "sent")
        ch.send(running)
        self._t_running = time.monotonic()
        self.stats.downtime_s = self._t_running - self._t_switch  # destination's share
        self._state_event()
        if self.opts.prefault and self.machine is not None:
            # Out of the downtime: a spare vCPU for KVM_PRE_FAULT_MEMORY, probed once on
            # a page that is installed (see engine.prefault).
            self.prefaulter = PreFaulter(self.machine, self.emit)
            self.prefaulter.probe(self._first_received_gpa())
        self._maybe_complete()

    def _start_guest(self, state: MachineState) -> None:
        assert self.ram is not None
        memory = self._memories[0]
        mark = StepTimer(self.stats.downtime_breakdown_ms).mark

        if not self.received.all_set():
            uffd = Userfaultfd.open(UffdFeature.THREAD_ID)
            for r in self.ram.regions:
                uffd.register(r.memory.address, r.memory.nbytes)
            self.uffd = uffd
            # Pages known to be zero were dropped while unregistered: install them now
            # so only pages that never arrived can fault.
            for page, n in self.zero.runs(True):
                for p, m in self.ram.split(page, n, self.ram.total_pages):
                    uffd.zeropage(self.ram.host_address(p), m * PAGE_SIZE)
            self.installer = PageInstaller(
                self.ram,
                self.received,
                uffd,
                self._bulk_done,
                nbuffers=self.opts.install_buffers,
                buffer_nbytes=self.opts.max_frame_nbytes,
            )
            loop = asyncio.get_running_loop()
            loop.add_reader(uffd.fileno(), self._on_faults)
            mark("userfaultfd-register")
        machine = Machine.restore(state, memory=memory, own_memory=True, console=self.opts.console)
        self.machine = machine
        mark("create-vm")
        self._memories = []  # the machine holds the memory now
        machine.start()
        mark("start-vcpus")
        self._tid_to_vcpu = machine.vcpu_thread_ids()

    def _first_received_gpa(self) -> int | None:
        assert self.ram is not None
        page, _ = self.received.find_run(0, True)
        return None if page < 0 else self.ram.gpa_of_page(page)

    # -- faults ------------------------------------------------------------------------

    def _on_faults(self) -> None:
        uffd, ram = self.uffd, self.ram
        if uffd is None or ram is None:
            return
        try:
            events = uffd.read_events()
        except OSError as exc:
            self.emit({"event": "error", "error": f"reading userfaultfd failed: {exc}"})
            return
        now = time.monotonic()
        for e in events:
            if e.kind is not UffdEventKind.PAGEFAULT:
                continue
            page = ram.page_of_host_address(e.address)
            if page is None:
                continue
            if self.received[page]:
                uffd.wake(ram.host_address(page), PAGE_SIZE)  # raced with an install
                continue
            pend = self._pending.get(page)
            if pend is not None:
                pend.waiters.append((e.thread_id, now))
                continue
            pend = _Pending(self._next_request_id, now, [(e.thread_id, now)])
            self._next_request_id += 1
            self._pending[page] = pend
            self.stats.postcopy_requests += 1
            self.stats.postcopy_requested_pages += 1
            self._send_request(page, pend)

    def _send_request(self, page: int, pend: _Pending) -> None:
        assert self.ram is not None
        req = PageRequest(pend.request_id, self.ram.gpa_of_page(page), 1)
        ch = self._urgent or self._main
        if (
            ch is None
            or ch.closed.done()
            or self.session.state is not MigrationState.POSTCOPY_ACTIVE
        ):
            return  # re-issued when the link is back
        with contextlib.suppress(ConnectionError, ProtocolError):
            self.session.handle(
                req,
                "sent",
                channel=ChannelRole.MAIN if ch.conn.channel is None else ch.conn.channel,
            )
            ch.send(req)

    def _reissue_requests(self) -> None:
        for page, pend in list(self._pending.items()):
            self._send_request(page, pend)

    # -- the end -----------------------------------------------------------------------

    def _on_all_sent(self, ch: Channel, a: AllSent) -> None:
        self._all_sent = True
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self._complete_sent or self.ram is None or self.machine is None:
            return
        if self.installed < self.ram.total_pages or self._main is None:
            return
        if self.session.state is not MigrationState.POSTCOPY_ACTIVE:
            return
        done = Complete(self.installed)
        self.session.handle(done, "sent")
        self._main.send(done)
        self._complete_sent = True

    def _on_complete_ack(self, ch: Channel, a: CompleteAck) -> None:
        assert self.ram is not None
        if self._bulk is not None:
            self._bulk.stop()
            self._bulk.join()
            self._merge_bulk_stats()
            self._bulk = None
        if self.installer is not None:
            self.installer.close()
            self.stats.install_s = self.installer.install_s
            self.stats.duplicate_pages += self.installer.duplicate_pages
            self.installer = None
        if self.uffd is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.uffd.fileno())
            for r in self.ram.regions:
                self.uffd.unregister(r.memory.address, r.memory.nbytes)
            self.uffd.close()
            self.uffd = None
        now = time.monotonic()
        self.stats.postcopy_s = now - self._t_running
        self.stats.total_s = now - self._t0
        if self.prefaulter is not None:
            self.stats.prefault = self.prefaulter.report()
            self.prefaulter.close()
        self._state_event()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _on_cancel(self, ch: Channel, c: Cancel) -> None:
        self._fail(MigrationAborted(f"the source cancelled the migration: {c.reason}"))

    def _on_error(self, ch: Channel, e: Error) -> None:
        if not self.session.point_of_no_return:
            self._fail(MigrationAborted(f"the source failed: {e.message}"))
        else:
            self.emit({"event": "error", "error": e.message})
            self._state_event()

    def _teardown_failed(self) -> None:
        """Release everything of a migration that failed before the guest ran here."""
        if self._bulk is not None:
            self._bulk.stop()
            self._bulk = None
        if self.installer is not None:
            self.installer.close()
            self.installer = None
        if self.uffd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.uffd.fileno())
            self.uffd.close()
            self.uffd = None
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        for m in self._memories:
            m.close()
        self._memories = []

    _handlers: dict[type, Callable[[DestinationEngine, Channel, Any], None]] = {
        Setup: _on_setup,
        Pages: _on_pages,
        ZeroPages: _on_zero_pages,
        Discard: _on_discard,
        DiscardBitmap: _on_discard_bitmap,
        PrecopyRoundEnd: _on_round_end,
        Switchover: _on_switchover,
        VmState: _on_vm_state,
        AllSent: _on_all_sent,
        CompleteAck: _on_complete_ack,
        Cancel: _on_cancel,
        Error: _on_error,
    }

    # -- reporting ---------------------------------------------------------------------

    def _state_event(self) -> None:
        self.stats.status = self.session.state.value
        self.emit({"event": "state", "side": "destination", "status": self.stats.status})

    async def _report_progress(self) -> None:
        while True:
            await asyncio.sleep(self.opts.progress_interval_s)
            if self.ram is None:
                continue
            self.emit(
                {
                    "event": "progress",
                    "side": "destination",
                    "status": self.session.state.value,
                    "elapsed_s": round(time.monotonic() - self._t0, 3),
                    "transferred_bytes": self.stats.transferred_bytes
                    + (self._bulk.normal_pages * PAGE_SIZE if self._bulk else 0),
                    "pages_installed": self.installed,
                    "total_pages": self.ram.total_pages,
                    "faults": self.stats.postcopy_requests,
                }
            )
            self._heartbeat()

    def _heartbeat(self) -> None:
        """Send ours; declare MAIN dead when the source's stopped arriving."""
        main, state, now = self._main, self.session.state, time.monotonic()
        if main is None or main.closed.done() or self.ram is None:
            return
        if state in (MigrationState.ACTIVE, MigrationState.POSTCOPY_ACTIVE):
            with contextlib.suppress(ConnectionError, ProtocolError):
                beat = Progress(self.stats.transferred_bytes, self.ram.total_pages - self.installed)
                self.session.handle(beat, "sent")
                main.send(beat)
            if main.silent_for(now) > self.opts.heartbeat_timeout_s:
                self.emit({"event": "link-silent", "seconds": round(main.silent_for(now), 1)})
                main.abort()
