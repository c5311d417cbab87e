"""In-memory stand-ins for the KVM machine and userfaultfd, for engine unit tests.

The engines under test are the real ones, talking over real loopback TCP; only what
needs /dev/kvm is faked: guest RAM is real anonymous memory (``GuestMemory``), but no
vCPU runs it.  The KVM tests and the integration suite prove the fakes honest:
everything here imitates a behaviour the kernel documents and those tests exercise.

* :class:`FakeMachine` (source side): its "guest" writes pages when the test says so
  (:meth:`FakeMachine.write`), which the fake dirty log records; pause/resume only flip
  a flag, and a write while paused is a test bug (asserted).
* :class:`FakeUffd` (destination side): UFFDIO_COPY/ZEROPAGE into the registered
  memory with EEXIST semantics; a fault is :meth:`FakeUffd.touch` — it queues the
  event and makes the fd readable (an eventfd), like a vCPU touching a missing page.
* :class:`FakeRestored`: the destination's VM, restored from a :class:`FakeState`.
* :class:`FakeShell`: what a destination builds at Setup for the restore to adopt.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack

from migrated.kernel import (
    CopyResult,
    FaultEvent,
    GuestMemory,
    InstallResult,
    PageBitmap,
    UffdEventKind,
)
from migrated.kernel.kvm import PreFaultResult
from migrated.vmm.machine import MemoryRegion, Runstate

PAGE = 4096


@dataclass
class FakeConfig:
    name: str = "fake"
    uuid: str = "00000000-0000-0000-0000-000000000000"
    vcpus: int = 1
    memory_bytes: int = 16 << 20


class FakeDirtyLog:
    def __init__(self, machine: FakeMachine) -> None:
        self.machine = machine
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True
        self.fetch()

    def disable(self) -> None:
        self.enabled = False

    def fetch(self) -> PageBitmap:
        m = self.machine
        with m.lock:
            out, m.dirty = m.dirty, PageBitmap(m.npages)
        return out


class FakeMachine:
    """A source VM without vCPUs: RAM filled with a pattern, written on demand."""

    def __init__(self, memory_bytes: int = 16 << 20, *, zero_every: int = 7) -> None:
        self.config = FakeConfig(memory_bytes=memory_bytes)
        memory = GuestMemory.create(memory_bytes)
        self.regions = [MemoryRegion(slot=0, gpa=0, memory=memory, owned=True)]
        self.npages = memory_bytes // PAGE
        self.lock = threading.Lock()
        self.dirty = PageBitmap(self.npages)
        self.runstate = Runstate.RUNNING
        self.closed = False
        self.pauses = 0
        view = memory.view
        for page in range(self.npages):
            if page % zero_every:  # every zero_every-th page stays zero (a zero run)
                view[page * PAGE : page * PAGE + 8] = page.to_bytes(8, "little")

    @property
    def memory(self) -> GuestMemory:
        return self.regions[0].memory

    def write(self, page: int, value: int) -> None:
        """The guest writes ``value`` into ``page`` (only while running)."""
        assert self.runstate is Runstate.RUNNING, "the guest wrote while paused"
        self.memory.view[page * PAGE + 8 : page * PAGE + 16] = value.to_bytes(8, "little")
        with self.lock:
            self.dirty.set(page)

    def dirty_log(self) -> FakeDirtyLog:
        return FakeDirtyLog(self)

    def pause(self) -> float:
        assert self.runstate is Runstate.RUNNING
        self.runstate = Runstate.PAUSED
        self.pauses += 1
        return 0.0

    def resume(self) -> None:
        assert self.runstate is Runstate.PAUSED
        self.runstate = Runstate.RUNNING

    def resident_ranges(self) -> tuple[tuple[int, int], ...]:
        return ((0, 2 * PAGE),)

    def capture_state(self) -> FakeState:
        assert self.runstate is Runstate.PAUSED
        return FakeState(self.config.name, self.config.memory_bytes)

    def close(self) -> None:
        self.closed = True
        self.memory.close()


@dataclass
class FakeState:
    name: str
    memory_bytes: int

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {"magic": "fake-vmstate", "name": self.name, "nbytes": self.memory_bytes}
        )


class FakeSpare:
    pre_fault_capability = False

    def pre_fault(self, gpa: int, nbytes: int) -> PreFaultResult:
        return PreFaultResult(False, 0, 1)

    def close(self) -> None:
        pass


@dataclass
class FakeShell:
    """What a destination builds at Setup for the restore to adopt (vmm.VmShell)."""

    vcpus: int
    closed: bool = False

    def close(self) -> None:
        self.closed = True


class FakeRestored:
    """The destination's VM: restored from a FakeState, "runs" without vCPUs."""

    def __init__(self, state_bytes: bytes, memory: GuestMemory) -> None:
        record = msgpack.unpackb(state_bytes)
        assert record["magic"] == "fake-vmstate"
        self.config = FakeConfig(name=record["name"], memory_bytes=record["nbytes"])
        self.regions = [MemoryRegion(slot=0, gpa=0, memory=memory, owned=True)]
        self.runstate = Runstate.CREATED
        self.closed = False

    @property
    def memory(self) -> GuestMemory:
        return self.regions[0].memory

    def start(self, *, paused: bool = False) -> None:
        assert self.runstate is Runstate.CREATED
        self.runstate = Runstate.PAUSED if paused else Runstate.RUNNING

    def resume(self) -> None:
        assert self.runstate is Runstate.PAUSED
        self.runstate = Runstate.RUNNING

    def vcpu_thread_ids(self) -> dict[int, int]:
        return {4242: 0}

    def spare_vcpu(self) -> FakeSpare:
        return FakeSpare()

    def close(self) -> None:
        self.closed = True
        self.memory.close()


@dataclass
class FakeUffd:
    """UFFDIO_COPY / ZEROPAGE / WAKE into registered memory; faults by :meth:`touch`."""

    present: set[int] = field(default_factory=set)  # host page addresses installed
    ranges: list[tuple[int, int]] = field(default_factory=list)
    events: list[FaultEvent] = field(default_factory=list)
    copies: int = 0
    wakes: int = 0

    def __post_init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.lock = threading.Lock()

    def fileno(self) -> int:
        return self.fd

    def register(self, address: int, nbytes: int) -> None:
        self.ranges.append((address, nbytes))

    def unregister(self, address: int, nbytes: int) -> None:
        self.ranges.remove((address, nbytes))

    def _inside(self, address: int, nbytes: int) -> bool:
        return any(a <= address and address + nbytes <= a + n for a, n in self.ranges)

    def copy(self, address: int, data: Any, nbytes: int, **_: Any) -> CopyResult:
        """Like the kernel layer's copy: present pages are skipped and counted."""
        assert self._inside(address, nbytes), f"UFFDIO_COPY outside registered RAM {address:#x}"
        src = memoryview(data).cast("B")
        present = 0
        for off in range(0, nbytes, PAGE):
            with self.lock:
                if address + off in self.present:
                    present += PAGE
                    continue
                buf = (ctypes.c_char * PAGE).from_buffer_copy(src[off : off + PAGE])
                ctypes.memmove(address + off, buf, PAGE)
                self.present.add(address + off)
        self.copies += 1
        return CopyResult(nbytes - present, present)

    def zeropage(self, address: int, nbytes: int, **_: Any) -> CopyResult:
        assert self._inside(address, nbytes)
        present = 0
        for off in range(0, nbytes, PAGE):
            with self.lock:
                if address + off in self.present:
                    present += PAGE
                    continue
                ctypes.memset(address + off, 0, PAGE)
                self.present.add(address + off)
        return CopyResult(nbytes - present, present)

    def wake(self, address: int, nbytes: int) -> None:
        self.wakes += 1

    def touch(self, address: int, thread_id: int = 4242) -> bool:
        """A vCPU touches ``address``: a fault unless the page is present.  Returns
        whether it faulted."""
        page_addr = address - address % PAGE
        with self.lock:
            if page_addr in self.present:
                return False
            self.events.append(FaultEvent(UffdEventKind.PAGEFAULT, address, True, thread_id))
        os.eventfd_write(self.fd, 1)
        return True

    def read_events(self, max_events: int = 64) -> list[FaultEvent]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)
        with self.lock:
            out, self.events = self.events[:max_events], self.events[max_events:]
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FakePageMap:
    """The kernel layer's PageMap over a FakeUffd: install only pages whose bit is
    clear, set each bit once its page is in place, skip and count present pages."""

    def __init__(self, regions: list[Any], bitmap: PageBitmap, uffd: FakeUffd) -> None:
        self.regions, self.bitmap, self.uffd = regions, bitmap, uffd
        self.lock = threading.Lock()

    def _address(self, page: int) -> int:
        first = 0
        for r in self.regions:
            npages = r.nbytes // PAGE
            if first <= page < first + npages:
                return int(r.host_address + (page - first) * PAGE)
            first += npages
        raise ValueError(f"page {page} outside the regions")

    def install(self, page: int, npages: int, data: Any | None) -> InstallResult:
        with self.lock:
            todo = self.bitmap.runs_within(page, npages, False)
        runs: list[tuple[int, int]] = []
        installed = present = 0
        for i, n in todo:
            addr = self._address(i)
            if data is None:
                r = self.uffd.zeropage(addr, n * PAGE)
            else:
                off = (i - page) * PAGE
                r = self.uffd.copy(addr, memoryview(data)[off : off + n * PAGE], n * PAGE)
            present += r.already_present // PAGE
            with self.lock:
                for j in range(i, i + n):  # claim what this call put in place
                    if not self.bitmap[j] and self._address(j) in self.uffd.present:
                        self.bitmap.set(j)
                        if runs and runs[-1][0] + runs[-1][1] == j:
                            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                        else:
                            runs.append((j, 1))
                        installed += 1
        skipped = npages - sum(n for _, n in todo)
        return InstallResult(runs, installed, skipped, present, 0.0)
