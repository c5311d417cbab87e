"""Guest RAM as the engines see it: the wire layout mapped onto host memory.

Pages are numbered globally across regions in layout order (the protocol's page
index).  Runs handed out here never cross a region boundary, so each maps to one
contiguous host range.
"""

from __future__ import annotations

import bisect
import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from migrated.kernel import GuestMemory, MappedRegion, PageBitmap, find_zero_pages
from migrated.protocol import MemoryLayout, MemoryRegion, Pages, ZeroPages

__all__ = ["GuestRam", "RamRegion", "staging_buffer"]

PAGE_SIZE = 4096


def staging_buffer(nbytes: int) -> memoryview:
    """A writable buffer whose pages are allocated on first use.  ``bytearray(n)``
    zero-fills eagerly: megabytes of first touches that must not happen inside the
    downtime or in front of a fault."""
    return memoryview(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


@dataclass(frozen=True)
class RamRegion:
    gpa: int
    memory: GuestMemory
    first_page: int  # global index of its first page

    @property
    def npages(self) -> int:
        return self.memory.nbytes // PAGE_SIZE


class GuestRam:
    """The machine's RAM regions, in GPA order, with page-index arithmetic."""

    def __init__(self, regions: Sequence[tuple[int, GuestMemory]]) -> None:
        out: list[RamRegion] = []
        first = 0
        for gpa, memory in sorted(regions, key=lambda r: r[0]):
            out.append(RamRegion(gpa, memory, first))
            first += memory.nbytes // PAGE_SIZE
        self.regions = tuple(out)
        self.total_pages = first
        self.nbytes = first * PAGE_SIZE
        self._firsts = [r.first_page for r in out]
        self.layout = MemoryLayout(
            tuple(MemoryRegion(r.gpa, r.memory.nbytes, PAGE_SIZE) for r in out)
        )

    def mapped_regions(self) -> list[MappedRegion]:
        """The regions as the kernel layer's page loops see them (layout order)."""
        return [
            MappedRegion(r.gpa, r.memory.nbytes, PAGE_SIZE, r.memory.address) for r in self.regions
        ]

    def region_of_page(self, page: int) -> RamRegion:
        if not 0 <= page < self.total_pages:
            raise IndexError(f"page {page} outside guest RAM of {self.total_pages} pages")
        return self.regions[bisect.bisect_right(self._firsts, page) - 1]

    def page_of_gpa(self, gpa: int) -> int:
        """Global page index of ``gpa`` (the caller validated it against the layout)."""
        return self.layout.page_index(gpa)

    def gpa_of_page(self, page: int) -> int:
        r = self.region_of_page(page)
        return r.gpa + (page - r.first_page) * PAGE_SIZE

    def host_address(self, page: int) -> int:
        r = self.region_of_page(page)
        return r.memory.address + (page - r.first_page) * PAGE_SIZE

    def page_of_host_address(self, address: int) -> int | None:
        for r in self.regions:
            off = address - r.memory.address
            if 0 <= off < r.memory.nbytes:
                return r.first_page + off // PAGE_SIZE
        return None

    def view(self, page: int, npages: int) -> memoryview:
        """Guest RAM of ``npages`` pages from ``page`` (must not cross a region).
        Touching it on a destination after userfaultfd registration can block."""
        r = self.region_of_page(page)
        off = (page - r.first_page) * PAGE_SIZE
        if page + npages > r.first_page + r.npages:
            raise IndexError(f"pages {page}+{npages} cross the end of their region")
        return r.memory.view[off : off + npages * PAGE_SIZE]

    def split(self, page: int, npages: int, max_pages: int) -> Iterator[tuple[int, int]]:
        """``[page, page+npages)`` cut at region ends and into pieces ≤ ``max_pages``."""
        end = page + npages
        while page < end:
            r = self.region_of_page(page)
            stop = min(end, r.first_page + r.npages, page + max_pages)
            yield page, stop - page
            page = stop

    def zero_split(
        self, page: int, npages: int, scratch: PageBitmap
    ) -> Iterator[tuple[bool, int, int]]:
        """Split a run (inside one region, ≤ ``len(scratch)`` pages) into maximal
        sub-runs of all-zero and non-zero pages: ``(is_zero, page, npages)``.

        Reads guest memory: source side only."""
        scratch.clear(0, len(scratch))
        nzero = find_zero_pages(self.host_address(page), npages, PAGE_SIZE, scratch)
        if nzero == 0:
            yield False, page, npages
            return
        if nzero == npages:
            yield True, page, npages
            return
        pos = 0
        while pos < npages:
            is_zero = scratch[pos]
            _i, n = scratch.find_run(pos, is_zero, npages - pos)
            n = min(n, npages - pos)
            yield is_zero, page + pos, n
            pos += n

    def frames(
        self, page: int, npages: int, max_pages: int, scratch: PageBitmap, request_id: int = 0
    ) -> Iterator[Pages | ZeroPages]:
        """The frames that carry ``[page, page+npages)``: runs of at most ``max_pages``
        inside one region, all-zero runs as ZeroPages, the rest as Pages whose data is a
        view of guest RAM (not copied).  ``scratch`` holds ``max_pages`` bits.

        Reads guest memory: source side only."""
        for p, n in self.split(page, npages, max_pages):
            for is_zero, q, m in self.zero_split(p, n, scratch):
                gpa = self.gpa_of_page(q)
                if is_zero:
                    yield ZeroPages(gpa, m, request_id)
                else:
                    yield Pages(gpa, m, self.view(q, m), request_id)

    def discard_marked(self, bitmap: PageBitmap) -> int:
        """MADV_DONTNEED every page set in the global ``bitmap``; returns the count."""
        return sum(r.memory.discard_marked(bitmap.data, r.first_page) for r in self.regions)

    def discard(self, page: int, npages: int) -> None:
        """MADV_DONTNEED the pages: they read as missing (userfaultfd) or zero."""
        for p, n in self.split(page, npages, self.total_pages):
            r = self.region_of_page(p)
            r.memory.discard((p - r.first_page) * PAGE_SIZE, n * PAGE_SIZE)
