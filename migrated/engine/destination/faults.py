"""Where a fault is served: read userfaultfd, deduplicate, request, answer, blocktime.

Facts we rely on (see also migrated.kernel.uffd):

* A vCPU (or KVM on its behalf) touching a missing page of registered guest RAM sleeps
  until the page is installed, by whichever path: the urgent answer to our request,
  the background push, or a zero run.  Installing wakes it.
* This service runs on the event loop and never touches guest memory: a page it
  touched while missing would block the loop that is supposed to install it.
* One request per missing page, however many vCPUs wait for it; waiters are kept per
  page so that per-vCPU blocktime can be measured (UFFD_FEATURE_THREAD_ID).
* A fault on a page whose received bit is set raced with an install that already woke
  the vCPU; we wake the range again to be sure.
* A request that could not be sent (no link) stays outstanding and is re-issued when
  the link is back (:meth:`reissue`).  A failure to read the fd is not survivable for
  the guest: it is raised to the engine (``failure``), never only logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from migrated.kernel import UffdEventKind, Userfaultfd
from migrated.protocol import MAX_REQUEST_NPAGES, PageRequest

from ..ram import PAGE_SIZE
from ..stats import MigrationStats
from .pages import PageStore, Runs

__all__ = ["FaultService"]

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """One outstanding page request."""

    request_id: int
    t0: float
    waiters: list[tuple[int, float]] = field(default_factory=list)  # (thread id, since)


class FaultService:
    """``send(request) -> bool`` sends a PageRequest (False: no link now, keep it)."""

    def __init__(
        self,
        store: PageStore,
        uffd: Userfaultfd,
        stats: MigrationStats,
        send: Callable[[PageRequest], bool],
        on_failure: Callable[[BaseException], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.uffd = uffd
        self.stats = stats
        self._send = send
        self._on_failure = on_failure
        self._clock = clock
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self.tid_to_vcpu: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.uffd.fileno(), self._on_readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.uffd.fileno())
            self._loop = None

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def _on_readable(self) -> None:
        try:
            events = self.uffd.read_events()
        except OSError as exc:
            self.stop()
            log.error("reading userfaultfd failed: %s; faults can no longer be served", exc)
            self._on_failure(exc)
            return
        now = self._clock()
        store, ram = self.store, self.store.ram
        for e in events:
            if e.kind is not UffdEventKind.PAGEFAULT:
                log.warning("unexpected userfaultfd event %s", e.kind.name)
                continue
            page = ram.page_of_host_address(e.address)
            if page is None:
                log.warning("fault outside guest RAM at %#x", e.address)
                continue
            if store.received[page]:
                self.uffd.wake(ram.host_address(page), PAGE_SIZE)  # raced with an install
                continue
            pend = self._pending.get(page)
            if pend is not None:
                pend.waiters.append((e.thread_id, now))
                continue
            pend = _Pending(self._next_id, now, [(e.thread_id, now)])
            self._next_id += 1
            self._pending[page] = pend
            store.wanted.set(page)
            self.stats.postcopy_requests += 1
            self.stats.postcopy_requested_pages += 1
            self._request(page, pend)

    def _request(self, page: int, pend: _Pending) -> None:
        req = PageRequest(pend.request_id, self.store.ram.gpa_of_page(page), 1)
        if not self._send(req):
            log.debug("page request %d deferred: no link", pend.request_id)

    def sweep(self, max_pages: int = 8192) -> int:
        """Ask for up to ``max_pages`` pages that are still missing although the source
        said it sent everything (AllSent) and no BULK connection is open: pages lost
        with a connection, or claimed and never written.  Returns how many were asked
        for.  Answers are installed like pushes; nothing waits on them here."""
        asked = 0
        for page, n in self.store.received.runs(False, MAX_REQUEST_NPAGES):
            if asked >= max_pages:
                break
            req = PageRequest(self._next_id, self.store.ram.gpa_of_page(page), n)
            self._next_id += 1
            if not self._send(req):
                break
            asked += n
        if asked:
            log.warning("%d pages still missing after AllSent: asked for them", asked)
        return asked

    def reissue(self) -> None:
        """Send every outstanding request again (after recovery)."""
        for page, pend in list(self._pending.items()):
            self._request(page, pend)

    def installed(self, runs: Runs) -> None:
        """Pages were newly installed: answer the faults waiting for them."""
        if not self._pending:
            return
        now = self._clock()
        for page, npages in runs:
            pages = range(page, page + npages) if npages <= 64 else list(self._pending)
            for p in pages:
                pend = self._pending.get(p)
                if pend is None or not page <= p < page + npages:
                    continue
                del self._pending[p]
                self.store.wanted.clear(p)
                self.stats.fault_latency.record(now - pend.t0)
                for tid, since in pend.waiters:
                    vcpu = self.tid_to_vcpu.get(tid, -1)
                    blocked = self.stats.blocktime_s_per_vcpu.get(vcpu, 0.0)
                    self.stats.blocktime_s_per_vcpu[vcpu] = blocked + now - since
