"""The C receive loop on real userfaultfd-registered memory: threads and a vCPU that
touch missing pages wait until the loop installs them; the urgent path installing the
same pages at the same time never makes a page counted twice or changed."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from migrated.kernel import (
    AcceleratedReceiver,
    ExitReason,
    GuestMemory,
    MappedRegion,
    PageBitmap,
    PageMap,
    Reason,
    Userfaultfd,
    VcpuExit,
    page_is_zero,
)
from migrated.protocol import MemoryLayout, MemoryRegion, Pages, ZeroPages

from .pagestream_util import HOOKS, MAX_FRAME, PAGE, opened, pattern, write_in_chunks
from .realmode import CODE_GPA, realmode_vm

pytestmark = pytest.mark.uffd

NPAGES = 96


@contextmanager
def registered(npages: int) -> Iterator[tuple[GuestMemory, Userfaultfd, PageMap, MemoryLayout]]:
    layout = MemoryLayout((MemoryRegion(0, npages * PAGE, PAGE),))
    with GuestMemory.create(npages * PAGE) as mem, Userfaultfd.open() as uffd:
        uffd.register(mem.address, mem.nbytes)
        pm = PageMap([MappedRegion(0, mem.nbytes, PAGE, mem.address)], PageBitmap(npages), uffd)
        try:
            yield mem, uffd, pm, layout
        finally:
            uffd.unregister(mem.address, mem.nbytes)


def page_content(page: int) -> bytes:
    return pattern(page + 1, PAGE)


def stream_of(layout: MemoryLayout, pages: list[tuple[int, int]], zero: set[int]) -> bytes:
    """Frames for the (first, npages) runs; pages in ``zero`` go as ZeroPages."""
    src = opened(layout).source
    out = bytearray()
    for first, n in pages:
        if first in zero:
            frame: Pages | ZeroPages = ZeroPages(first * PAGE, n, 0)
        else:
            data = b"".join(page_content(p) for p in range(first, first + n))
            frame = Pages(first * PAGE, n, memoryview(data), 0)
        for buf in src.send(frame):
            out += bytes(buf)
    return bytes(out)


def receive_all(rx: AcceleratedReceiver, batch_nbytes: int = 1 << 16) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    while True:
        r = rx.receive(batch_nbytes=batch_nbytes, timeout_s=10)
        assert r.reason is not Reason.IDLE
        runs += r.runs
        if r.reason is Reason.EOF:
            return runs


def pages_of(runs: list[tuple[int, int]]) -> list[int]:
    return [p for first, n in runs for p in range(first, first + n)]


def test_threads_waiting_on_missing_pages_are_woken_by_the_loop() -> None:
    with registered(NPAGES) as (mem, _uffd, pm, layout):
        zero = {3, 40}
        results: dict[int, bool] = {}

        def touch(page: int) -> None:  # blocks in C (GIL released) until installed
            results[page] = page_is_zero(mem.address + page * PAGE, PAGE)

        waiters = [threading.Thread(target=touch, args=(p,)) for p in (3, 17, 40, 95)]
        for t in waiters:
            t.start()
        time.sleep(0.05)
        assert all(t.is_alive() for t in waiters), "a missing page must make its reader wait"
        runs_wire: list[tuple[int, int]] = []
        for p in range(NPAGES):  # runs of up to 4 pages; the zero pages alone
            last = runs_wire[-1] if runs_wire else None
            if p in zero or last is None or last[0] in zero or last[1] == 4:
                runs_wire.append((p, 1))
            else:
                runs_wire[-1] = (last[0], last[1] + 1)
        a, b = socket.socketpair()
        writer = write_in_chunks(a, stream_of(layout, runs_wire, zero), [])
        rx = AcceleratedReceiver(b, opened(layout).dest, pm, HOOKS)
        reported = receive_all(rx)
        writer.join()
        for t in waiters:
            t.join(10)
            assert not t.is_alive()
        assert results == {3: True, 17: False, 40: True, 95: False}
        assert sorted(pages_of(reported)) == list(range(NPAGES))
        assert pm.bitmap.count() == NPAGES
        for p in range(NPAGES):
            want = bytes(PAGE) if p in zero else page_content(p)
            assert bytes(mem.view[p * PAGE : (p + 1) * PAGE]) == want
        stats = rx.loop.stats
        assert stats.installed_pages == NPAGES and rx.python_frames == 0
        rx.close()
        a.close()
        b.close()


def urgent(pm: PageMap, seed: int, stop: threading.Event, runs: list[tuple[int, int]]) -> None:
    """The event loop answering faults, page by page, at random."""
    rng = random.Random(seed)
    while not stop.is_set():
        p = rng.randrange(NPAGES)
        runs.extend(pm.install(p, 1, page_content(p)).runs)


def test_urgent_installs_racing_with_the_loop_count_every_page_once() -> None:
    rng = random.Random(7)
    for i in range(20):
        with registered(NPAGES) as (mem, _uffd, pm, layout):
            stop = threading.Event()
            urgent_runs: list[tuple[int, int]] = []
            t = threading.Thread(
                target=urgent, args=(pm, rng.randrange(1 << 30), stop, urgent_runs)
            )
            t.start()
            wire = [(p, min(6, NPAGES - p)) for p in range(0, NPAGES, 6)]
            a, b = socket.socketpair()
            pieces = [PAGE] * 200 if i % 2 else []  # slow, then at full speed
            writer = write_in_chunks(a, stream_of(layout, wire, set()), pieces)
            rx = AcceleratedReceiver(b, opened(layout).dest, pm, HOOKS)
            loop_runs = receive_all(rx, batch_nbytes=PAGE)
            stop.set()
            t.join()
            writer.join()
            everyone = pages_of(loop_runs) + pages_of(urgent_runs)
            assert sorted(everyone) == list(range(NPAGES)), "each page reported exactly once"
            assert pm.bitmap.count() == NPAGES
            for p in range(NPAGES):
                assert bytes(mem.view[p * PAGE : (p + 1) * PAGE]) == page_content(p)
            rx.close()
            a.close()
            b.close()


# mov al, [0x5000] ; out 0x10, al ; mov al, [0x7000] ; out 0x10, al ; hlt
READ_TWO_PAGES = bytes.fromhex("a00050e610a00070e610f4")


@pytest.mark.kvm
def test_a_vcpu_waits_for_the_pages_the_loop_installs() -> None:
    with realmode_vm(READ_TWO_PAGES, write_code=False) as rm, Userfaultfd.open() as uffd:
        mem = rm.memory
        npages = mem.nbytes // PAGE
        uffd.register(mem.address, mem.nbytes)
        layout = MemoryLayout((MemoryRegion(0, mem.nbytes, PAGE),))
        pm = PageMap([MappedRegion(0, mem.nbytes, PAGE, mem.address)], PageBitmap(npages), uffd)
        exits: list[VcpuExit] = []

        def vcpu() -> None:
            while True:
                ex = rm.vcpu.run()
                exits.append(ex)
                if ex.reason is not ExitReason.IO:
                    return

        t = threading.Thread(target=vcpu)
        t.start()
        time.sleep(0.05)
        assert t.is_alive() and not exits, "the vCPU waits for its code page"
        src = opened(layout).source
        code = bytearray(PAGE)
        code[: len(READ_TWO_PAGES)] = READ_TWO_PAGES
        frames: list[Pages | ZeroPages] = [Pages(CODE_GPA, 1, memoryview(bytes(code)), 0)]
        frames.append(Pages(0x5000, 1, memoryview(b"\xa5" * PAGE), 0))
        frames.append(ZeroPages(0x7000, 1, 0))
        frames.append(ZeroPages(0x8000, npages - 8, 0))
        stream = b"".join(bytes(b) for f in frames for b in src.send(f))
        a, b = socket.socketpair()
        writer = write_in_chunks(a, stream, [])
        rx = AcceleratedReceiver(b, opened(layout).dest, pm, HOOKS)
        receive_all(rx)
        writer.join()
        t.join(10)
        assert not t.is_alive()
        assert [e.data for e in exits if e.reason is ExitReason.IO] == [b"\xa5", b"\x00"]
        assert exits[-1].reason is ExitReason.HLT
        rx.close()
        uffd.unregister(mem.address, mem.nbytes)
        a.close()
        b.close()


def test_interrupt_and_idle_return_and_the_stream_continues() -> None:
    with registered(8) as (_mem, _uffd, pm, layout):
        a, b = socket.socketpair()
        rx = AcceleratedReceiver(b, opened(layout).dest, pm, HOOKS)
        assert rx.receive(batch_nbytes=0, timeout_s=0.05).reason is Reason.IDLE
        threading.Timer(0.05, rx.interrupt).start()
        t0 = time.monotonic()
        assert rx.receive(batch_nbytes=0, timeout_s=10).reason is Reason.INTERRUPTED
        assert time.monotonic() - t0 < 5
        # Half a frame, an interrupt in the middle, then the rest: nothing is lost.
        stream = stream_of(layout, [(0, 2)], set())
        a.sendall(stream[:100])
        threading.Timer(0.05, rx.interrupt).start()
        assert rx.receive(batch_nbytes=0, timeout_s=10).reason is Reason.INTERRUPTED
        a.sendall(stream[100:])
        a.shutdown(socket.SHUT_WR)
        assert sorted(pages_of(receive_all(rx))) == [0, 1]
        rx.close()
        a.close()
        b.close()


def test_frames_larger_than_the_limit_are_the_connections_to_refuse() -> None:
    with registered(16) as (_mem, _uffd, pm, layout):
        from migrated.errors import RemoteProtocolError

        big = MAX_FRAME // PAGE + 1
        data = memoryview(bytes(big * PAGE))
        src = opened(layout).source
        src.max_frame_payload = big * PAGE  # the sender's limit is larger than ours
        stream = b"".join(bytes(x) for x in src.send(Pages(0, big, data, 0)))
        a, b = socket.socketpair()
        writer = write_in_chunks(a, stream, [])
        rx = AcceleratedReceiver(b, opened(layout).dest, pm, HOOKS)
        with pytest.raises(RemoteProtocolError) as info:
            receive_all(rx)
        assert info.value.code == "frame-too-large"
        assert pm.bitmap.count() == 0
        rx.close()
        b.close()
        writer.join()
        a.close()


def test_a_watched_page_makes_the_loop_return_as_soon_as_it_is_installed() -> None:
    with registered(NPAGES) as (_mem, _uffd, pm, layout):
        wanted = PageBitmap(NPAGES)
        wanted.set(20)
        wanted.set(50)
        a, b = socket.socketpair()
        wire = [(p, min(6, NPAGES - p)) for p in range(0, NPAGES, 6)]
        writer = write_in_chunks(a, stream_of(layout, wire, {24}), [])
        rx = AcceleratedReceiver(b, opened(layout).dest, pm, HOOKS)
        rx.loop.watch(wanted)
        seen = []
        while True:
            r = rx.receive(batch_nbytes=0, timeout_s=10)
            assert r.reason is not Reason.IDLE
            if r.reason is Reason.WANTED:
                got = set(pages_of(r.runs))
                hit = [p for p in (20, 50) if p in got and wanted[p]]
                assert len(hit) == 1 and max(got) < hit[0] + 6  # at once, not later
                wanted.clear(hit[0])  # the fault is answered
                seen.append(hit[0])
            if r.reason is Reason.EOF:
                break
        assert seen == [20, 50]
        assert pm.bitmap.count() == NPAGES
        writer.join()
        rx.close()
        a.close()
        b.close()
