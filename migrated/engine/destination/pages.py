"""Every page that arrives, whatever channel carried it, goes through a PageStore.

Facts we rely on:

* Before ``VmState`` nothing is registered with userfaultfd and the guest does not run
  here, so precopy pages are received straight into guest RAM (:meth:`precopy_target`
  hands the socket the guest pages themselves), a later copy of a page overwrites an
  earlier one, zero runs and discards are dropped with MADV_DONTNEED.
* From ``VmState`` on the store is *sealed*: guest RAM is written only by the kernel
  (UFFDIO_COPY from a staging buffer, UFFDIO_ZEROPAGE), and only for pages whose
  received bit is clear.  A page the guest may own is never changed — not by a late
  push, not by a zero run, not by a source resending after recovery (issue: a
  ZeroPages over installed pages once zeroed them in the live guest).
* The received bitmap is the single source of truth: a bit is set exactly when the
  page's current content is in place; :attr:`count` is its population, kept with it
  under :attr:`lock` (one popcount per frame would cost milliseconds per GiB).
* After sealing every install goes through one :class:`~migrated.kernel.PageMap`
  over the received bitmap: the kernel layer installs a page only if its bit is clear
  and sets the bit with an atomic claim once the page is in place, so each page is
  reported once however many paths race (urgent answers on the loop, the BULK
  receiver's C loop, the installer thread).  A page found present (EEXIST) was
  installed by another path: skipped and woken.  :attr:`count` is kept under
  :attr:`lock` from the runs each install reports.
* :attr:`wanted` has a bit per page a vCPU waits for (the fault service keeps it):
  the BULK receiver's C loop returns as soon as it installed one, so the fault is
  answered at once rather than at the end of its batch.
* Ranges were checked against the layout by the protocol connection before any event
  or payload reached us; :class:`GuestRam` checks page indexes again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from migrated.kernel import MappedRegion, PageBitmap, PageMap, Userfaultfd
from migrated.vmm.admission import Reservation

from ..ram import PAGE_SIZE, GuestRam

__all__ = ["PageStore", "Runs"]

log = logging.getLogger(__name__)

Runs = list[tuple[int, int]]
#: Makes the page map installs go through: the kernel layer's (a test may fake it).
NewPageMap = Callable[[list[MappedRegion], PageBitmap, Userfaultfd], PageMap]


class PageStore:
    """The destination's guest RAM and what of it has arrived."""

    def __init__(self, ram: GuestRam, new_pagemap: NewPageMap = PageMap) -> None:
        self.ram = ram
        self._new_pagemap = new_pagemap
        self.received = PageBitmap(ram.total_pages)
        #: Pages known to be zero and dropped before registration: installed with
        #: UFFDIO_ZEROPAGE at sealing, so only pages that never arrived can fault.
        self.zero = PageBitmap(ram.total_pages)
        self.lock = threading.Lock()
        self.count = 0
        self.uffd: Userfaultfd | None = None
        self.pagemap: PageMap | None = None
        self.wanted = PageBitmap(ram.total_pages)
        self.sealed = False
        self.install_s = 0.0
        self.duplicate_pages = 0
        #: Memory held for the guest since Setup (vmm.admission.Reservation), given
        #: back as pages with data take their place; None when not reserving.
        self.reservation: Reservation | None = None

    @property
    def total_pages(self) -> int:
        return self.ram.total_pages

    @property
    def complete(self) -> bool:
        """Every page has arrived (by the count; see :meth:`all_arrived`)."""
        return self.count == self.ram.total_pages

    def all_arrived(self) -> bool:
        """Whether every bit of the received bitmap is set: the truth, which
        :attr:`count` only caches (checked periodically: a count that lost an update
        must not keep the migration from completing)."""
        if self.received.all_set():
            if self.count != self.ram.total_pages:
                log.error(
                    "installed-page count %d lags the received bitmap (all %d pages): a bug",
                    self.count,
                    self.ram.total_pages,
                )
            return True
        return False

    def snapshot(self) -> bytes:
        """The received bitmap now (for recovery), consistent with :attr:`count`."""
        with self.lock:
            return bytes(self.received.data)

    # -- before VmState: guest RAM written in place ----------------------------------

    def precopy_target(self, page: int, npages: int) -> memoryview:
        """Where a precopy Pages payload goes: the guest pages themselves."""
        assert not self.sealed
        return self.ram.view(page, npages)

    def precopy_pages(self, page: int, npages: int) -> None:
        """The payload of a precopy Pages frame is in place."""
        self.zero.clear(page, npages)
        self._took(self._mark(page, npages))

    def precopy_zero(self, page: int, npages: int) -> None:
        self.ram.discard(page, npages)  # reads as zero; a no-op where never written
        self.zero.set(page, npages)
        self._mark(page, npages)

    def discard(self, page: int, npages: int) -> int:
        """Drop pages sent earlier but dirtied since; returns how many."""
        assert not self.sealed
        with self.lock:
            self.count -= npages - self._clear_count(page, npages)
            self.received.clear(page, npages)
        self.zero.clear(page, npages)
        self.ram.discard(page, npages)
        return npages

    def discard_marked(self, stale: PageBitmap) -> int:
        assert not self.sealed
        with self.lock:
            self.received.andnot(stale)
            self.count = self.received.count()
        self.zero.andnot(stale)
        return self.ram.discard_marked(stale)

    # -- from VmState on: only missing pages, only by the kernel ------------------------

    def seal(self, uffd: Userfaultfd | None) -> None:
        """From now on guest RAM is the guest's: see the module notes.  ``uffd`` is the
        registered userfaultfd (None when every page had arrived)."""
        self.sealed = True
        self.uffd = uffd
        if uffd is None:
            return
        self.pagemap = self._new_pagemap(self.ram.mapped_regions(), self.received, uffd)
        for page, n in self.zero.runs(True):
            for p, m in self.ram.split(page, n, self.ram.total_pages):
                uffd.zeropage(self.ram.host_address(p), m * PAGE_SIZE)

    def install(self, page: int, npages: int, data: memoryview | None) -> Runs:
        """Install the pages of ``[page, page+npages)`` that have not arrived yet
        (``data`` None: zero pages).  Returns the runs this call newly put in place.
        Any thread."""
        assert self.sealed
        if self.pagemap is None:
            with self.lock:  # nothing registered: every page had arrived
                self.duplicate_pages += npages
            return []
        r = self.pagemap.install(page, npages, data)
        self.installed(r.runs, duplicates=r.skipped_pages + r.present_pages, install_s=r.install_s)
        if data is not None:
            self._took(r.runs)
        return r.runs

    def installed(self, runs: Runs, *, duplicates: int = 0, install_s: float = 0.0) -> None:
        """Account for pages the kernel layer put in place (install, or a C loop)."""
        with self.lock:
            self.count += sum(n for _, n in runs)
            self.duplicate_pages += duplicates
            self.install_s += install_s

    def _took(self, runs: Runs) -> None:
        """Pages with data now hold memory: give the same back from the reservation."""
        if runs:
            self.took_bytes(sum(n for _, n in runs) * PAGE_SIZE)

    def took_bytes(self, nbytes: int) -> None:
        if self.reservation is not None and nbytes:
            self.reservation.release(nbytes)

    # -- bookkeeping -------------------------------------------------------------------

    def _clear_count(self, page: int, npages: int) -> int:
        return sum(n for _, n in self.received.runs_within(page, npages, False))

    def _mark(self, page: int, npages: int) -> Runs:
        with self.lock:
            return self._mark_locked(page, npages)

    def _mark_locked(self, page: int, npages: int) -> Runs:
        """Set the bits; returns the sub-runs that were newly set."""
        new = self.received.runs_within(page, npages, False)
        self.received.set(page, npages)
        self.count += sum(n for _, n in new)
        return new
