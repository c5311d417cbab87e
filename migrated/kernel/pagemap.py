"""Guest RAM as the page loops see it: regions in layout order, their host mappings,
one shared page bitmap, and (on a destination) the userfaultfd that installs pages.

Facts we rely on:

* Pages are numbered globally in region order (the protocol's page index): region
  0's pages first.  A range handed to :meth:`PageMap.install` lies inside one region.
* On a destination (``uffd`` given) guest RAM is registered with userfaultfd and is
  written only by the kernel, with UFFDIO_COPY / UFFDIO_ZEROPAGE, for pages whose bit
  is clear.  A page that is already present (EEXIST) was installed by another path:
  it is skipped and its range woken; its bit is that path's to set.  Nothing here
  reads or writes registered guest memory from user space, so no call can block on
  a missing page.
* Without ``uffd`` (direct mode: a source, or a destination before registration)
  :meth:`install` writes guest memory itself and overwrites every page.
* A bit is set only after its page is in place, with an atomic claim: each page is
  reported as installed by exactly one call, however many threads install the same
  pages at once (the C receive loop, the event loop's urgent answers).  ``install``
  may be called from any thread, concurrently with the loops.
* hugetlbfs has no UFFDIO_ZEROPAGE; zero runs of huge-page regions are installed with
  UFFDIO_COPY from a read-only zero mapping (which costs no memory).
* The memory, the bitmap and the userfaultfd must outlive every loop that uses this
  map: their owner joins the loop's thread before closing them.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._util import check, ffi, lib
from .bitmap import PageBitmap
from .uffd import Userfaultfd

__all__ = ["InstallResult", "MappedRegion", "PageMap"]

Runs = list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class MappedRegion:
    """One region of guest RAM: guest-physical ``gpa``, ``nbytes``, ``page_size`` and
    the host virtual address where it is mapped."""

    gpa: int
    nbytes: int
    page_size: int
    host_address: int

    @property
    def npages(self) -> int:
        return self.nbytes // self.page_size


@dataclass(frozen=True, slots=True)
class InstallResult:
    """What one install did.  ``runs``: ``(first_page, npages)`` this call newly put in
    place (and set the bits of); ``skipped_pages``: bits already set, not touched;
    ``present_pages``: found present (installed by another path) and woken."""

    runs: Runs
    installed_pages: int
    skipped_pages: int
    present_pages: int
    install_s: float


class PageMap:
    """``regions`` in layout order over ``bitmap`` (one bit per page, global index).

    Raises ValueError if the regions are malformed or the bitmap is too small.  The
    object holds the C view (:attr:`c`) the page loops use; it does not own the
    memory, the bitmap or the userfaultfd.
    """

    def __init__(
        self,
        regions: Sequence[MappedRegion],
        bitmap: PageBitmap,
        uffd: Userfaultfd | None = None,
    ) -> None:
        if not regions:
            raise ValueError("a page map needs at least one region")
        self.regions = tuple(regions)
        self.bitmap = bitmap
        self.uffd = uffd
        self.first_pages: tuple[int, ...] = ()
        firsts, first = [], 0
        for r in self.regions:
            ps = r.page_size
            if ps < 4096 or ps & (ps - 1) or r.nbytes <= 0 or r.nbytes % ps or r.gpa % ps:
                raise ValueError(f"region {r} is not page-aligned with a power-of-two page size")
            if r.host_address % ps and ps <= mmap.PAGESIZE:
                raise ValueError(f"region {r} is not mapped at a page-aligned address")
            firsts.append(first)
            first += r.npages
        self.first_pages = tuple(firsts)
        self.total_pages = first
        if len(bitmap) < first:
            raise ValueError(f"bitmap of {len(bitmap)} bits is too small for {first} pages")
        self._regions_c = ffi.new("struct mig_region[]", len(self.regions))
        for i, (r, f) in enumerate(zip(self.regions, firsts, strict=True)):
            c = self._regions_c[i]
            c.gpa, c.nbytes, c.page_size = r.gpa, r.nbytes, r.page_size
            c.host, c.first_page = r.host_address, f
        max_ps = max(r.page_size for r in self.regions)
        # Read-only anonymous zeroes for hugetlb zero runs: never written, never backed.
        self._zero_src = (
            mmap.mmap(-1, max_ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ)
            if max_ps > 4096
            else None
        )
        self.c: Any = ffi.new("struct mig_pagemap *")
        self.c.regions = self._regions_c
        self.c.nregions = len(self.regions)
        self.c.uffd = uffd.fileno() if uffd is not None else -1
        self.c.bitmap = bitmap._c
        self.c.nbits = first
        if self._zero_src is not None:
            self._zero_c = ffi.from_buffer("uint8_t[]", self._zero_src)  # keeps the export alive
            self.c.zero_src = self._zero_c

    def region_index_of_gpa(self, gpa: int) -> int:
        """Index of the region holding ``gpa``; ValueError if none."""
        for i, r in enumerate(self.regions):
            if r.gpa <= gpa < r.gpa + r.nbytes:
                return i
        raise ValueError(f"gpa {gpa:#x} is in no region")

    def page_of_gpa(self, gpa: int) -> int:
        """Global page index of the page holding ``gpa``; ValueError if none."""
        i = self.region_index_of_gpa(gpa)
        r = self.regions[i]
        return self.first_pages[i] + (gpa - r.gpa) // r.page_size

    def page_size_of_gpa(self, gpa: int) -> int:
        return self.regions[self.region_index_of_gpa(gpa)].page_size

    def host_view(self, page: int, npages: int) -> memoryview:
        """Host memory of pages ``[page, page+npages)`` (inside one region).  On a
        registered destination, touching a missing page through it blocks."""
        for i, r in enumerate(self.regions):
            first = self.first_pages[i]
            if first <= page < first + r.npages:
                if page + npages > first + r.npages:
                    break
                off = (page - first) * r.page_size
                ptr = ffi.cast("char *", r.host_address + off)
                return memoryview(ffi.buffer(ptr, npages * r.page_size))
        raise ValueError(f"pages {page}+{npages} are not inside one region")

    def install(self, page: int, npages: int, data: Any | None) -> InstallResult:
        """Install pages ``[page, page+npages)`` from ``data`` (a buffer of exactly
        ``npages * page_size`` bytes) or as zero pages (``data`` None).  Any thread.

        Raises ValueError for a range outside one region or a wrong buffer size, and
        OSError when the kernel refuses (anything but EEXIST / EAGAIN); pages put in
        place before the error keep their bits.
        """
        src = ffi.NULL
        ps = self._page_size_of_range(page, npages)
        if data is not None:
            src = ffi.from_buffer("uint8_t[]", data)
            if len(src) != npages * ps:
                raise ValueError(f"install of {npages} pages needs {npages * ps} bytes")
        res = ffi.new("struct mig_install_result *")
        runs_out: Runs = []
        chunk = int(lib.MIG_INSTALL_CHUNK)
        runs = ffi.new("uint64_t[]", 2 * (chunk // 2 + 2))
        done = 0
        while done < npages:
            n = min(chunk, npages - done)
            res.nruns = 0
            piece = src if data is None else src + done * ps
            rc = lib.mig_install(self.c, page + done, n, piece, runs, res)
            for k in range(res.nruns):
                first, length = int(runs[2 * k]), int(runs[2 * k + 1])
                if runs_out and runs_out[-1][0] + runs_out[-1][1] == first:
                    runs_out[-1] = (runs_out[-1][0], runs_out[-1][1] + length)
                else:
                    runs_out.append((first, length))
            check(rc, f"installing pages {page + done}+{n}")
            done += n
        return InstallResult(
            runs_out,
            int(res.installed_pages),
            int(res.skipped_pages),
            int(res.present_pages),
            int(res.install_ns) / 1e9,
        )

    def _page_size_of_range(self, page: int, npages: int) -> int:
        for i, r in enumerate(self.regions):
            first = self.first_pages[i]
            if first <= page < first + r.npages:
                if npages < 1 or page + npages > first + r.npages:
                    break
                return r.page_size
        raise ValueError(f"pages {page}+{npages} are not inside one region")
