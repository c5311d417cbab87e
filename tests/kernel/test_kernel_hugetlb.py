"""hugetlbfs guest memory (2 MiB pages) under userfaultfd, installed by the C loop.

Needs free huge pages: as root the fixture raises vm.nr_hugepages for the test and
restores it afterwards; without them the tests skip (huge pages are a machine-wide
resource, not something every host has to spare).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrated.kernel import (
    AcceleratedReceiver,
    Backing,
    GuestMemory,
    MappedRegion,
    PageBitmap,
    PageMap,
    Reason,
    UffdFeature,
    Userfaultfd,
    page_is_zero,
)
from migrated.protocol import MemoryLayout, MemoryRegion, Pages, ZeroPages

from .pagestream_util import HOOKS, opened, pattern, write_in_chunks

HUGE = 2 << 20
NHUGE = 8
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def free_huge_pages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


@pytest.fixture
def huge_pages() -> Iterator[None]:
    from tests.conftest import uffd_usable

    if uffd_usable() is not None:
        pytest.skip(str(uffd_usable()))
    old = NR_HUGEPAGES.read_text().strip()
    raised = False
    if free_huge_pages() < NHUGE:
        try:
            NR_HUGEPAGES.write_text(str(int(old) + NHUGE))
            raised = True
        except OSError as exc:
            pytest.skip(f"cannot reserve huge pages: {exc}")
    try:
        if free_huge_pages() < NHUGE:
            pytest.skip(f"only {free_huge_pages()} free huge pages")
        yield
    finally:
        if raised:
            NR_HUGEPAGES.write_text(old)


def huge_content(page: int) -> bytes:
    return pattern(page + 11, HUGE)


def test_the_c_loop_installs_huge_pages_and_wakes_their_waiters(huge_pages: None) -> None:
    nbytes = NHUGE * HUGE
    layout = MemoryLayout((MemoryRegion(0, nbytes, HUGE),))
    with GuestMemory.create(nbytes, Backing.HUGETLB) as mem, Userfaultfd.open() as uffd:
        assert mem.page_size == HUGE
        assert UffdFeature.MISSING_HUGETLBFS in uffd.available
        uffd.register(mem.address, nbytes)
        pm = PageMap([MappedRegion(0, nbytes, HUGE, mem.address)], PageBitmap(NHUGE), uffd)
        seen: dict[int, bool] = {}

        def touch(page: int) -> None:  # waits in C, GIL released, until installed
            seen[page] = page_is_zero(mem.address + page * HUGE + 12345 // 4096 * 4096, 4096)

        waiters = [threading.Thread(target=touch, args=(p,)) for p in (2, 5)]
        for t in waiters:
            t.start()
        time.sleep(0.05)
        assert all(t.is_alive() for t in waiters)
        # The urgent path installs huge page 6 first.
        r = pm.install(6, 1, huge_content(6))
        assert (r.runs, r.present_pages) == ([(6, 1)], 0)
        src = opened(layout, max_frame=2 * HUGE).source
        frames: list[Pages | ZeroPages] = [
            Pages(0, 2, memoryview(huge_content(0) + huge_content(1)), 0),
            ZeroPages(2 * HUGE, 2, 0),  # no UFFDIO_ZEROPAGE on hugetlbfs: copied zeroes
            Pages(4 * HUGE, 1, memoryview(huge_content(4)), 0),
            Pages(5 * HUGE, 2, memoryview(huge_content(5) + bytes(HUGE)), 0),  # 6: owned
            Pages(7 * HUGE, 1, memoryview(huge_content(7)), 0),
        ]
        stream = b"".join(bytes(b) for f in frames for b in src.send(f))
        a, b = socket.socketpair()
        writer = write_in_chunks(a, stream, [1 << 16] * 64)
        conn = opened(layout, max_frame=2 * HUGE).dest
        rx = AcceleratedReceiver(b, conn, pm, HOOKS)
        runs: list[tuple[int, int]] = []
        while (got := rx.receive(batch_nbytes=HUGE, timeout_s=10)).reason is not Reason.EOF:
            assert got.reason is not Reason.IDLE
            runs += got.runs
        runs += got.runs
        writer.join()
        for t in waiters:
            t.join(10)
            assert not t.is_alive()
        assert seen == {2: True, 5: False}
        assert sorted(p for f, n in runs for p in range(f, f + n)) == [0, 1, 2, 3, 4, 5, 7]
        assert pm.bitmap.count() == NHUGE
        assert rx.loop.stats.skipped_pages == 1  # huge page 6 was left alone
        for p in range(NHUGE):
            want = bytes(HUGE) if p in (2, 3) else huge_content(p)
            assert bytes(mem.view[p * HUGE : (p + 1) * HUGE]) == want, f"huge page {p}"
        # A present huge page whose bit is clear (another path is installing it): skipped.
        pm.bitmap.clear(7)
        r = pm.install(7, 1, bytes(HUGE))
        assert (r.installed_pages, r.present_pages) == (0, 1)
        assert bytes(mem.view[7 * HUGE : 7 * HUGE + 64]) == huge_content(7)[:64]
        rx.close()
        uffd.unregister(mem.address, nbytes)
        a.close()
        b.close()
