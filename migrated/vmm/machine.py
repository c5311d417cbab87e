"""Machine: a KVM VM with guest RAM, boot-ABI devices, and one thread per vCPU.

Facts we rely on (see also migrated/kernel/kvm.py):

* Each vCPU has exactly one thread that runs KVM_RUN and handles its exits.  That thread
  also loads the vCPU's initial state (boot registers or a restored VcpuState) before
  the first KVM_RUN, so on a migration destination no VMM thread but the vCPU's own ever
  touches the vCPU, and none touches guest memory at all: a vCPU may block inside
  KVM_RUN on a page userfaultfd has not installed yet while everything else runs on.
* Pausing never polls.  ``pause()`` sets ``kvm_run.immediate_exit`` on every vCPU and
  sends each vCPU thread KICK_SIGNAL (a Python handler is installed, so the signal only
  interrupts the ioctl).  A thread about to enter KVM_RUN sees immediate_exit and gets
  EINTR at once; a thread inside gets EINTR from the signal.  Either way KVM first
  completes the I/O instruction of the previous exit (for an IN with the data we set):
  KVM documents re-entering with immediate_exit=1 as the way to make the state
  consistent.  A thread that parks right after handling an exit does exactly that
  re-entry before parking, so a parked vCPU never has half-done I/O and its captured
  state can be resumed anywhere.
* All run-state fields are guarded by one Condition (``_cond``); vCPU threads park on it.
  Status reports use the StatusBoard's own condition.
"""

from __future__ import annotations

import contextlib
import enum
import signal
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from migrated.errors import GuestCrashed, MachineStateError
from migrated.kernel import (
    ExitReason,
    GuestMemory,
    Kvm,
    Regs,
    Vcpu,
    VcpuExit,
    VcpuState,
    Vm,
    set_thread_name,
)

from . import boot
from .config import VmConfig
from .devices import (
    PORT_CLOCK_US,
    PORT_COMMAND,
    PORT_CONSOLE,
    PORT_SLEEP_US,
    PORT_STATUS,
    Command,
    CommandMailbox,
    Console,
    StatusBoard,
    StatusCode,
    StatusReport,
)
from .dirtylog import DirtyLog, SpareVcpu
from .image import ImageInfo, load_image
from .shell import VmShell
from .state import MemoryRegionInfo, VmState, VmStateError

__all__ = [
    "KICK_SIGNAL",
    "CrashInfo",
    "Machine",
    "MachineStateError",
    "MachineStatus",
    "MemoryRegion",
    "Runstate",
    "VcpuRunstate",
    "VcpuStatus",
    "install_kick_handler",
]

KICK_SIGNAL = signal.SIGUSR1
MAX_SLEEP_S = 1.0  # longest sleep one OUT to port 0x513 can ask for
_THREAD_JOIN_S = 10.0


class Runstate(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"  # stop() was called or every vCPU halted
    CRASHED = "crashed"  # a vCPU crashed; the others were stopped


class VcpuRunstate(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PARKED = "parked"  # outside KVM_RUN, state stable (machine paused)
    HALTED = "halted"  # the guest ended this vCPU (HLT or STATUS_HALT)
    CRASHED = "crashed"
    STOPPED = "stopped"  # the VMM stopped it


# vCPU run states in which a vCPU is outside KVM_RUN for good or until resumed.
_SETTLED = frozenset(
    {VcpuRunstate.PARKED, VcpuRunstate.HALTED, VcpuRunstate.CRASHED, VcpuRunstate.STOPPED}
)


@dataclass(frozen=True)
class CrashInfo:
    """Why a vCPU crashed, with its registers at that point (when readable)."""

    vcpu: int
    reason: str
    regs: Regs | None

    def describe(self) -> str:
        text = f"vCPU {self.vcpu} crashed: {self.reason}"
        if self.regs is not None:
            r = self.regs
            text += (
                f"\n  rip={r.rip:#x} rsp={r.rsp:#x} rflags={r.rflags:#x}"
                f"\n  rax={r.rax:#x} rbx={r.rbx:#x} rcx={r.rcx:#x} rdx={r.rdx:#x}"
                f"\n  rsi={r.rsi:#x} rdi={r.rdi:#x} rbp={r.rbp:#x} r8={r.r8:#x}"
            )
        return text


@dataclass(frozen=True)
class VcpuStatus:
    index: int
    runstate: VcpuRunstate
    last_report: StatusReport | None  # latest report other than PROGRESS
    last_progress: StatusReport | None
    crash: CrashInfo | None


@dataclass(frozen=True)
class MachineStatus:
    name: str
    uuid: str
    runstate: Runstate
    memory_bytes: int
    vcpus: tuple[VcpuStatus, ...]
    console_bytes: int

    def describe(self) -> str:
        """Human lines, e.g. for ``migrated status``."""
        lines = [
            f"{self.name} ({self.uuid}): {self.runstate.value}, "
            f"{self.memory_bytes >> 20} MiB, {len(self.vcpus)} vCPU(s)"
        ]
        for v in self.vcpus:
            line = f"  vCPU {v.index}: {v.runstate.value}"
            if v.last_report is not None:
                line += f"; {v.last_report.text}"
            if v.last_progress is not None:
                line += f"; {v.last_progress.text}"
            lines.append(line)
            if v.crash is not None:
                lines.append("    " + v.crash.describe().replace("\n", "\n    "))
        return "\n".join(lines)


@dataclass
class MemoryRegion:
    """A guest RAM region: ``memory`` mapped at ``gpa`` in KVM slot ``slot``."""

    slot: int
    gpa: int
    memory: GuestMemory
    owned: bool  # the machine created it and closes it

    @property
    def nbytes(self) -> int:
        return self.memory.nbytes


@dataclass
class _Runner:
    """Book-keeping of one vCPU thread.  Fields are guarded by Machine._cond."""

    vcpu: Vcpu
    initial_state: VcpuState | None  # None: boot state
    runstate: VcpuRunstate = VcpuRunstate.CREATED
    thread: threading.Thread | None = None
    io_pending: bool = False  # an exit was handled; the next KVM_RUN completes it
    crash: CrashInfo | None = None
    init_error: BaseException | None = None
    init_done: bool = False
    halted_before: bool = False  # restored as halted: never run
    exits: int = field(default=0)


def _noop_handler(signum: int, frame: Any) -> None:
    pass


def install_kick_handler() -> None:
    """Make KICK_SIGNAL interrupt KVM_RUN instead of killing the process.

    Python only installs signal handlers from the main thread; call this from there
    once before starting machines from other threads.  A handler someone else already
    installed is kept (any handler interrupts the ioctl).  Raises MachineStateError
    when called from another thread while no handler is installed.
    """
    current = signal.getsignal(KICK_SIGNAL)
    if callable(current):
        return
    if threading.current_thread() is not threading.main_thread():
        raise MachineStateError(
            f"no handler for {KICK_SIGNAL.name} is installed and this is not the main thread",
            hint="call migrated.vmm.install_kick_handler() from the main thread at startup",
        )
    signal.signal(KICK_SIGNAL, _noop_handler)


class Machine:
    """A VM with its memory, devices and vCPU threads.

    Build one with :meth:`boot` (fresh guest) or :meth:`restore` (continue a captured
    state), then :meth:`start`.  Run-state changes: CREATED -start-> RUNNING <-pause/
    resume-> PAUSED; stop() from any state -> STOPPED; a vCPU crash -> CRASHED.
    ``close()`` stops and releases everything; it is idempotent.
    """

    def __init__(
        self,
        config: VmConfig,
        *,
        image: ImageInfo,
        params: tuple[int, ...],
        kvm: Kvm | None,
        memory: GuestMemory | None,
        console: str | None,
        own_memory: bool = False,
        initial_states: Sequence[VcpuState] | None = None,
        halted: Sequence[bool] | None = None,
        board: StatusBoard | None = None,
        mailbox: CommandMailbox | None = None,
        console_bytes: int = 0,
        shell: VmShell | None = None,
    ) -> None:
        if shell is not None and (memory is None or not shell.fits(memory, config.vcpus)):
            raise VmStateError(
                f"the prepared KVM VM does not fit this VM ({config.vcpus} vCPUs, "
                f"{config.memory_bytes} bytes of RAM)"
            )
        self.config = config
        self.image = image
        self.params = params
        # One lock, two conditions: vCPU threads wait on ``_wake`` (run state changes
        # for them: start, pause, resume, stop, a crash), their owner waits on
        # ``_cond`` (vCPU state changes: loaded, parked, stopped, halted).  A vCPU that
        # parks therefore wakes only its owner, not the other parked vCPUs (eight
        # vCPUs parking used to wake each other 64 times, each wake-up taking the GIL).
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        self._wake = threading.Condition(lock)
        self._runstate = Runstate.CREATED
        self._pause_requested = False
        self._stop_requested = False
        self._started = False  # start() settled the run state; vCPU threads may run
        self._closed = False
        self._kvm: Kvm | None = None
        self._owns_kvm = False
        self._vm: Vm | None = None
        self.regions: list[MemoryRegion] = []
        self._runners: list[_Runner] = []
        self.board = board if board is not None else StatusBoard(config.vcpus)
        self.mailbox = mailbox if mailbox is not None else CommandMailbox(config.vcpus)
        self.console = Console(
            console if console is not None else config.console, bytes_written=console_bytes
        )
        try:
            if memory is None:
                # A booted VM's RAM is never registered with userfaultfd: back it with
                # transparent huge pages (as QEMU does), which makes the source's page
                # scans and pushes cheaper (fewer TLB misses: 0.27 -> 0.19 CPU-s/GiB
                # for the C push loop here, bench/pageloops.py).
                memory = GuestMemory.create(config.memory_bytes, transparent_huge_pages=True)
                owned = True
            else:
                owned = own_memory
                if memory.nbytes != config.memory_bytes:
                    raise ValueError(
                        f"guest memory of {memory.nbytes} bytes supplied for a VM of "
                        f"{config.memory_bytes} bytes"
                    )
            self.regions.append(MemoryRegion(slot=0, gpa=0, memory=memory, owned=owned))
            if shell is None:  # the KVM VM, its slot and vCPUs, now
                shell = VmShell(memory, config.vcpus, kvm=kvm)
            self._kvm, self._vm, vcpus, self._owns_kvm = shell.take()
            for i, vcpu in enumerate(vcpus):
                state = initial_states[i] if initial_states is not None else None
                runner = _Runner(vcpu=vcpu, initial_state=state)
                if halted is not None and halted[i]:
                    runner.halted_before = True
                    runner.runstate = VcpuRunstate.HALTED
                self._runners.append(runner)
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------

    @classmethod
    def boot(
        cls,
        config: VmConfig,
        *,
        kvm: Kvm | None = None,
        memory: GuestMemory | None = None,
        own_memory: bool = False,
        console: str | None = None,
    ) -> Machine:
        """A machine whose vCPUs will start at the guest's entry under the boot ABI.

        Loads the image and writes the boot area (page tables, GDT/TSS, parameters)
        into guest memory, which must be zero (fresh) when supplied; supplied memory is
        closed by ``close()`` only with ``own_memory=True``.  ``console`` overrides
        ``config.console``.  Raises ConfigError/GuestBuildError for a bad image, OSError
        when KVM refuses.
        """
        data, info = load_image(config.guest, config.memory_bytes)
        params = config.guest.boot_params(config.vcpus)
        machine = cls(
            config,
            image=info,
            params=params,
            kvm=kvm,
            memory=memory,
            own_memory=own_memory,
            console=console,
        )
        try:
            view = machine.memory.view
            for gpa, blob in boot.build_boot_area(
                ram_bytes=config.memory_bytes, vcpus=config.vcpus, params=params
            ):
                view[gpa : gpa + len(blob)] = blob
            view[info.load_gpa : info.load_gpa + len(data)] = data
        except BaseException:
            machine.close()
            raise
        return machine

    @classmethod
    def restore(
        cls,
        state: VmState,
        *,
        memory: GuestMemory | None = None,
        own_memory: bool = False,
        config: VmConfig | None = None,
        kvm: Kvm | None = None,
        console: str | None = None,
        shell: VmShell | None = None,
    ) -> Machine:
        """A machine whose vCPUs continue from ``state``.

        ``memory`` is the guest RAM to run on, supplied from outside (already filled,
        or registered with userfaultfd so vCPUs fault pages in); ``close()`` closes it
        only with ``own_memory=True``.  If None, zeroed RAM is created (and owned) and
        the caller fills ``machine.memory`` before ``start()``.  This method never
        touches guest memory.  ``config`` defaults to the one in the
        state.  ``shell``, built ahead over ``memory``, is adopted instead of creating
        the KVM VM, its slot and vCPUs now (see vmm.shell); once adopted the machine
        closes it, even when this raises.  Raises VmStateError when the state does not
        fit (size, vCPU count, shell).
        """
        if config is None:
            config = VmConfig.from_dict(state.config)
        if len(state.vcpus) != config.vcpus:
            raise VmStateError(f"VM state has {len(state.vcpus)} vCPUs, the config {config.vcpus}")
        if state.memory_bytes != config.memory_bytes or len(state.regions) != 1:
            raise VmStateError(
                f"VM state describes {state.memory_bytes} bytes of RAM in "
                f"{len(state.regions)} region(s); this VM has {config.memory_bytes} bytes"
            )
        if memory is not None and memory.nbytes != config.memory_bytes:
            raise VmStateError(
                f"supplied guest memory has {memory.nbytes} bytes, the state {config.memory_bytes}"
            )
        board = StatusBoard.restore(config.vcpus, state.report_seqs, state.reports)
        mailbox = CommandMailbox(config.vcpus, state.pending_commands)
        return cls(
            config,
            image=state.image,
            params=state.params,
            kvm=kvm,
            memory=memory,
            own_memory=own_memory,
            console=console,
            initial_states=state.vcpus,
            halted=state.halted,
            board=board,
            mailbox=mailbox,
            console_bytes=state.console_bytes,
            shell=shell,
        )

    # -- properties -----------------------------------------------------------------

    @property
    def memory(self) -> GuestMemory:
        """Guest RAM of the (single, for now) region at GPA 0."""
        return self.regions[0].memory

    @property
    def vm(self) -> Vm:
        """The KVM VM.  For the vmm layer only: engines use :meth:`dirty_log` and
        :meth:`spare_vcpu`."""
        if self._vm is None:
            raise MachineStateError("machine is closed")
        return self._vm

    def dirty_log(self) -> DirtyLog:
        """A view of KVM's dirty log of all guest RAM (see vmm.dirtylog)."""
        return DirtyLog(self)

    def spare_vcpu(self) -> SpareVcpu:
        """A vCPU that never runs, for ioctls that must not wait for a running vCPU
        (see vmm.dirtylog).  The caller closes it before the machine."""
        return SpareVcpu(self)

    @property
    def runstate(self) -> Runstate:
        return self._runstate

    @property
    def crash(self) -> CrashInfo | None:
        """The first vCPU crash, if any."""
        for r in self._runners:
            if r.crash is not None:
                return r.crash
        return None

    def raise_if_crashed(self) -> None:
        """Raise GuestCrashed (with registers in the message) if a vCPU crashed."""
        crash = self.crash
        if crash is not None:
            raise GuestCrashed(crash.describe())

    # -- run control ----------------------------------------------------------------

    def start(self, *, paused: bool = False, timeout_s: float = _THREAD_JOIN_S) -> None:
        """Start the vCPU threads.  Each loads its initial state; start() returns once
        all have (then RUNNING, or PAUSED with ``paused=True``).

        Raises MachineStateError when not CREATED or when a vCPU could not load its
        state (the machine is then STOPPED; ``__cause__`` is the OSError).
        """
        install_kick_handler()
        with self._cond:
            self._require(Runstate.CREATED)
            self._pause_requested = paused
            for r in self._runners:
                r.vcpu.immediate_exit = paused
            live = [r for r in self._runners if not r.halted_before]
            for r in live:
                r.thread = threading.Thread(
                    target=self._vcpu_main,
                    args=(r,),
                    name=f"{self.config.name}-vcpu{r.vcpu.index}",
                    daemon=True,
                )
                r.thread.start()
            ok = self._cond.wait_for(lambda: all(r.init_done for r in live), timeout_s)
            failed = next((r for r in live if r.init_error is not None), None)
            self._started = True
            if ok and failed is None:
                if not live:
                    self._runstate = Runstate.STOPPED
                else:
                    self._runstate = Runstate.PAUSED if paused else Runstate.RUNNING
                self._wake.notify_all()
                return
            self._stop_requested = True
            self._wake.notify_all()
        self.stop()
        if failed is not None:
            raise MachineStateError(
                f"vCPU {failed.vcpu.index} could not load its initial state: {failed.init_error}"
            ) from failed.init_error
        raise MachineStateError(f"vCPU threads did not start within {timeout_s:g} s")

    def pause(self, *, timeout_s: float = _THREAD_JOIN_S) -> float:
        """Stop every vCPU outside KVM_RUN with its I/O completed; returns the seconds it
        took.

        Raises MachineStateError unless RUNNING, or if a vCPU does not park within
        ``timeout_s``; then the pause is rolled back and the machine stays RUNNING.  The
        usual cause is a vCPU blocked inside KVM_RUN on a page userfaultfd has not
        installed: measured on kvm_pvm, the kick signal does not interrupt that wait
        (KVM_RUN returns only once the page is there).  Raises GuestCrashed if the
        guest crashed meanwhile."""
        t0 = time.monotonic()
        with self._cond:
            self._require(Runstate.RUNNING)
            self._pause_requested = True
            for r in self._runners:
                r.vcpu.immediate_exit = True
            self._wake.notify_all()  # vCPU threads sleeping for port 0x513
        self._kick_all()
        with self._cond:
            settled = self._cond.wait_for(
                lambda: all(r.runstate in _SETTLED for r in self._runners), timeout_s
            )
            if self._runstate is Runstate.CRASHED:
                self.raise_if_crashed()
            if not settled:
                # Roll back: the machine keeps running rather than being left half
                # paused.  Vcpus that did park run on; the busy ones never stopped.
                busy = [r.vcpu.index for r in self._runners if r.runstate not in _SETTLED]
                self._pause_requested = False
                for r in self._runners:
                    r.vcpu.immediate_exit = False
                self._wake.notify_all()
                raise MachineStateError(
                    f"vCPU(s) {busy} did not leave KVM_RUN within {timeout_s:g} s; "
                    "the machine keeps running",
                    hint="a vCPU blocked on a guest page userfaultfd has not installed yet "
                    "cannot be kicked out; serve the page, then pause again",
                )
            if self._runstate is Runstate.RUNNING:
                self._runstate = Runstate.PAUSED
        return time.monotonic() - t0

    def resume(self) -> None:
        """Let parked vCPUs run again.  Raises MachineStateError unless PAUSED."""
        with self._cond:
            self._require(Runstate.PAUSED)
            for r in self._runners:
                r.vcpu.immediate_exit = False
            self._pause_requested = False
            self._runstate = Runstate.RUNNING
            self._wake.notify_all()

    def stop(self, *, timeout_s: float = _THREAD_JOIN_S) -> None:
        """End all vCPU threads (from any state; idempotent).  The guest gets no say:
        see request_stop() for a guest-side stop.  Raises MachineStateError if a vCPU
        thread does not end within ``timeout_s``."""
        with self._cond:
            self._stop_requested = True
            for r in self._runners:
                r.vcpu.immediate_exit = True
            self._wake.notify_all()
        self._kick_all()
        deadline = time.monotonic() + timeout_s
        for r in self._runners:
            if r.thread is not None and r.thread is not threading.current_thread():
                r.thread.join(max(0.0, deadline - time.monotonic()))
                if r.thread.is_alive():
                    raise MachineStateError(
                        f"vCPU {r.vcpu.index} thread did not end within {timeout_s:g} s"
                    )
        with self._cond:
            if self._runstate is not Runstate.CRASHED:
                self._runstate = Runstate.STOPPED
            self._cond.notify_all()
        self.board.wake()

    def close(self) -> None:
        """Stop the vCPUs and release the VM, vCPUs, owned memory and /dev/kvm."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._runners:
                self.stop()
        finally:
            for r in self._runners:
                r.vcpu.close()
            if self._vm is not None:
                self._vm.close()
            for region in self.regions:
                if region.owned:
                    region.memory.close()
            if self._owns_kvm and self._kvm is not None:
                self._kvm.close()
            self.console.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- guest commands and reports -------------------------------------------------

    def request_verify(self) -> tuple[int, ...]:
        """Ask every vCPU to verify its memory now.  Returns the report marks to pass
        as ``since`` to :meth:`wait_reports`."""
        marks = self.board.marks()
        self.mailbox.post(Command.VERIFY)
        return marks

    def request_stop(self) -> None:
        """Ask the guest to stop: each vCPU halts at its next command poll."""
        self.mailbox.post(Command.STOP)

    def wait_reports(
        self,
        codes: Sequence[int],
        *,
        since: Sequence[int] | None = None,
        timeout_s: float = 30.0,
    ) -> tuple[StatusReport, ...]:
        """For every vCPU that has not halted, the newest report with a code in
        ``codes`` newer than ``since`` (marks from request_verify/board.marks(); None
        means any report ever).  Raises TimeoutError naming the silent vCPUs,
        GuestCrashed if the guest crashed, MachineStateError if a vCPU halted or the
        machine stopped while waiting."""
        vcpus = [r.vcpu.index for r in self._runners if r.runstate is not VcpuRunstate.HALTED]
        marks = list(since) if since is not None else [0] * len(self._runners)

        def check() -> None:
            self.raise_if_crashed()
            for i in vcpus:
                if self._runners[i].runstate is VcpuRunstate.HALTED:
                    raise MachineStateError(f"vCPU {i} halted while a report was awaited")
            if self._runstate is Runstate.STOPPED:
                raise MachineStateError("machine stopped while a report was awaited")

        return self.board.wait(codes, vcpus, marks, timeout_s, check)

    def wait_ready(self, timeout_s: float = 30.0) -> tuple[StatusReport, ...]:
        """Wait until every running vCPU reported READY (at any time)."""
        return self.wait_reports([StatusCode.READY], timeout_s=timeout_s)

    def verify(self, timeout_s: float = 30.0) -> tuple[StatusReport, ...]:
        """Request a verify pass and wait for its VERIFY_OK/VERIFY_FAIL from every
        running vCPU.  Returns the reports (check ``.ok``); raises like wait_reports."""
        marks = self.request_verify()
        return self.wait_reports(
            [StatusCode.VERIFY_OK, StatusCode.VERIFY_FAIL], since=marks, timeout_s=timeout_s
        )

    def wait_stopped(self, timeout_s: float = 30.0) -> Runstate:
        """Wait until the machine is STOPPED or CRASHED and every vCPU is out of KVM_RUN
        for good; returns which.  Raises TimeoutError."""
        with self._cond:
            done = self._cond.wait_for(
                lambda: (
                    self._runstate in (Runstate.STOPPED, Runstate.CRASHED)
                    and all(r.runstate in _SETTLED for r in self._runners)
                ),
                timeout_s,
            )
            if not done:
                raise TimeoutError(f"machine still {self._runstate.value} after {timeout_s:g} s")
            return self._runstate

    def vcpu_thread_ids(self) -> dict[int, int]:
        """Kernel thread id (as userfaultfd reports with UFFD_FEATURE_THREAD_ID) ->
        vCPU index, for the vCPU threads started so far."""
        ids = {}
        for r in self._runners:
            if r.thread is not None and r.thread.native_id is not None:
                ids[r.thread.native_id] = r.vcpu.index
        return ids

    def console_tail(self) -> bytes:
        """The last few KiB the guest wrote to the console."""
        return self.console.tail()

    def status(self) -> MachineStatus:
        """A consistent snapshot of the run states, latest reports and crash records."""
        reports = self.board.all_reports()
        with self._cond:
            runstate = self._runstate
            per_vcpu = [(r.vcpu.index, r.runstate, r.crash) for r in self._runners]
        vcpus = []
        for i, vcpu_runstate, crash in per_vcpu:
            mine = [rep for rep in reports if rep.vcpu == i]
            others = [rep for rep in mine if rep.code != StatusCode.PROGRESS]
            latest = max(others, key=lambda rep: rep.seq) if others else None
            progress = self.board.latest(i, StatusCode.PROGRESS)
            vcpus.append(VcpuStatus(i, vcpu_runstate, latest, progress, crash))
        return MachineStatus(
            name=self.config.name,
            uuid=self.config.uuid,
            runstate=runstate,
            memory_bytes=sum(reg.nbytes for reg in self.regions),
            vcpus=tuple(vcpus),
            console_bytes=self.console.bytes_written,
        )

    def resident_ranges(self) -> tuple[tuple[int, int], ...]:
        """``(gpa, nbytes)`` ranges that must be in place before a restored vCPU runs:
        the VMM area below the image (GDT, TSSs with their I/O bitmaps, page tables,
        boot parameters, stacks).  KVM reads descriptor tables and the I/O bitmap in
        contexts that cannot wait for userfaultfd: on kvm_pvm a missing TSS page turns
        the guest's next OUT into #GP and a triple fault.  A migration sends these
        pages during the downtime, before the vCPU state."""
        return ((0, boot.IMAGE_GPA),)

    # -- state capture --------------------------------------------------------------

    def capture_state(self) -> VmState:
        """The complete vCPU and device state of a PAUSED machine (guest memory is not
        included).  Raises MachineStateError unless PAUSED."""
        with self._cond:
            self._require(Runstate.PAUSED)
            vcpu_states = tuple(r.vcpu.get_state() for r in self._runners)
            halted = tuple(r.runstate is VcpuRunstate.HALTED for r in self._runners)
        return VmState(
            config=self.config.to_dict(),
            regions=tuple(MemoryRegionInfo(g.slot, g.gpa, g.nbytes) for g in self.regions),
            image=self.image,
            params=self.params,
            vcpus=vcpu_states,
            halted=halted,
            console_bytes=self.console.bytes_written,
            report_seqs=self.board.marks(),
            reports=tuple(self.board.all_reports()),
            pending_commands=self.mailbox.pending(),
        )

    # -- internals ------------------------------------------------------------------

    def _require(self, *states: Runstate) -> None:
        if self._runstate not in states:
            wanted = " or ".join(s.value for s in states)
            raise MachineStateError(
                f"machine {self.config.name} is {self._runstate.value}, needs to be {wanted}"
            )

    def _kick_all(self) -> None:
        for r in self._runners:
            t = r.thread
            if t is None or t.ident is None or not t.is_alive() or t is threading.current_thread():
                continue
            # The thread may end between the check and the kill.
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(t.ident, KICK_SIGNAL)

    def _load_initial_state(self, r: _Runner) -> None:
        vcpu = r.vcpu
        if r.initial_state is not None:
            vcpu.set_state(r.initial_state)
            return
        cfg = self.config
        vcpu.set_sregs(
            boot.boot_sregs(vcpu.get_sregs(), vcpu_index=vcpu.index, vcpus=cfg.vcpus, cpl=cfg.cpl)
        )
        vcpu.set_regs(
            boot.boot_regs(
                vcpu_index=vcpu.index,
                vcpus=cfg.vcpus,
                ram_bytes=cfg.memory_bytes,
                entry_gpa=self.image.entry_gpa,
                cpl=cfg.cpl,
            )
        )

    def _vcpu_main(self, r: _Runner) -> None:
        """Body of a vCPU thread.  Never raises: failures become crash records."""
        set_thread_name(f"vcpu{r.vcpu.index}/{self.config.name}")  # QEMU: "CPU 0/KVM"
        try:
            self._load_initial_state(r)
        except BaseException as exc:
            with self._cond:
                r.init_error = exc
                r.init_done = True
                r.runstate = VcpuRunstate.STOPPED
                self._cond.notify_all()
            return
        with self._cond:
            r.init_done = True
            self._cond.notify_all()
            # Run nothing before start() has settled the run state.
            self._wake.wait_for(lambda: self._started)
        try:
            self._run_loop(r)
        except BaseException as exc:  # a bug or an unexpected KVM error: a crash, not a traceback
            self._crashed(r, f"VMM error while running the vCPU: {exc!r}")

    def _run_loop(self, r: _Runner) -> None:
        vcpu = r.vcpu
        while True:
            with self._cond:
                complete_io = r.io_pending and (self._pause_requested or self._stop_requested)
                if not complete_io:
                    while self._pause_requested and not self._stop_requested:
                        r.runstate = VcpuRunstate.PARKED
                        self._cond.notify_all()
                        self._wake.wait()
                    if self._stop_requested:
                        if r.runstate is not VcpuRunstate.CRASHED:
                            r.runstate = VcpuRunstate.STOPPED
                        self._cond.notify_all()
                        return
                    r.runstate = VcpuRunstate.RUNNING
            # With complete_io, pause()/stop() has already set immediate_exit (under the
            # lock, before the flag we saw): this KVM_RUN finishes the pending I/O
            # instruction and returns EINTR without running guest code.  Had resume()
            # cleared it meanwhile, the vCPU simply runs on.
            try:
                exit_ = vcpu.run()
            except InterruptedError:
                r.io_pending = False
                continue
            r.io_pending = False
            r.exits += 1
            if not self._handle_exit(r, exit_):
                return

    def _handle_exit(self, r: _Runner, e: VcpuExit) -> bool:
        """Handle one exit; False ends the thread (halt or crash)."""
        vcpu = r.vcpu
        if e.reason is ExitReason.IO:
            r.io_pending = True
            port = e.port
            if e.io_in:
                if port == PORT_COMMAND:
                    value = self.mailbox.take(vcpu.index)
                elif port == PORT_CLOCK_US:
                    value = (time.monotonic_ns() // 1000) & 0xFFFFFFFF
                else:
                    return self._crashed(
                        r, f"IN from port {port:#x}, which the boot ABI does not define"
                    )
                vcpu.set_io_in_data(value.to_bytes(8, "little")[: e.size] * e.count)
                return True
            if port == PORT_CONSOLE:
                self.console.write(e.data)
                return True
            if port == PORT_STATUS:
                if e.size != 4 or e.count != 1:
                    return self._crashed(r, f"OUT of {e.size} bytes to the status port (needs 4)")
                (code,) = struct.unpack("<I", e.data)
                regs = vcpu.get_regs()
                self.board.post(vcpu.index, code, (regs.rbx, regs.rcx, regs.rsi, regs.rdi))
                if code == StatusCode.HALT:
                    return self._halted(r)
                return True
            if port == PORT_SLEEP_US:
                sleep_s = min(int.from_bytes(e.data[: e.size], "little") / 1e6, MAX_SLEEP_S)
                with self._wake:
                    self._wake.wait_for(
                        lambda: self._pause_requested or self._stop_requested, sleep_s
                    )
                return True
            return self._crashed(r, f"OUT to port {port:#x}, which the boot ABI does not define")
        if e.reason is ExitReason.HLT:
            return self._halted(r)
        if e.reason is ExitReason.SHUTDOWN:
            return self._crashed(
                r, "triple fault (KVM_EXIT_SHUTDOWN): an exception with no handler"
            )
        if e.reason is ExitReason.FAIL_ENTRY:
            return self._crashed(r, f"VM entry failed (hardware reason {e.detail:#x})")
        if e.reason is ExitReason.INTERNAL_ERROR:
            return self._crashed(r, f"KVM internal error (suberror {e.detail})")
        if e.reason is ExitReason.MMIO:
            return self._crashed(r, "access to a guest physical address outside RAM (MMIO exit)")
        return self._crashed(r, f"unexpected exit {e.reason.name} ({e.raw_reason})")

    def _halted(self, r: _Runner) -> bool:
        with self._cond:
            r.runstate = VcpuRunstate.HALTED
            all_halted = all(x.runstate is VcpuRunstate.HALTED for x in self._runners)
            if all_halted and self._runstate in (Runstate.RUNNING, Runstate.PAUSED):
                self._runstate = Runstate.STOPPED
            self._cond.notify_all()
        self.board.wake()
        return False

    def _crashed(self, r: _Runner, reason: str) -> bool:
        try:
            regs: Regs | None = r.vcpu.get_regs()
        except OSError:
            regs = None
        with self._cond:
            r.crash = CrashInfo(r.vcpu.index, reason, regs)
            r.runstate = VcpuRunstate.CRASHED
            self._runstate = Runstate.CRASHED
            self._stop_requested = True
            for other in self._runners:
                other.vcpu.immediate_exit = True
            self._cond.notify_all()
            self._wake.notify_all()  # the other vCPUs stop too
        self._kick_all()
        self.board.wake()
        return False
