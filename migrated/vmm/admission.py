"""Memory admission: can this host hold a guest of N bytes, and hold on to it?

A destination calls :func:`admit` when ``Setup`` announces a guest (before any page
arrives) and ``migrated run`` calls it before booting.  It raises
:class:`~migrated.errors.InsufficientMemory` naming what is needed, what is available
and which limit binds.  :func:`reserve` then takes the memory for real, so that a
check that passed cannot be raced later, when failing would lose the VM.

Facts we rely on:

* Guest RAM is ``MAP_NORESERVE``: ``mmap`` succeeds whatever its size (except under
  ``vm.overcommit_memory=2``, where even NORESERVE mappings are accounted), and the
  memory is taken page by page as it is written.  Without admission a too-large guest
  is accepted and the OOM killer ends the receiving process, in postcopy after the
  point of no return, with the only running copy of the VM.
* Anonymous and shmem (memfd) pages are charged to the memory cgroup of the process
  that faults them in (``UFFDIO_COPY`` charges the registering process).  Hugetlb
  pages are not charged to the memory cgroup (only to the hugetlb controller).
* A memory cgroup's budget is the tightest of its own and every ancestor's:
  cgroup v2 ``memory.max`` (and ``memory.high``, past which the kernel throttles and
  reclaims) minus ``memory.current``; cgroup v1 ``memory.limit_in_bytes`` minus
  ``memory.usage_in_bytes`` (hierarchy is always on since Linux 5.16).  Usage
  includes page cache the kernel can drop; ``inactive_file`` from ``memory.stat`` is
  counted as available, as container runtimes do for their working set.
* The cgroup files are read through the cgroup file systems mounted in this
  process's mount namespace.  Where they are hidden (``ip netns exec`` remounts
  /sys, and with it /sys/fs/cgroup) the cgroup's limit cannot be read: the
  admission lists it in ``unchecked`` instead of guessing.
* ``MemAvailable`` is the kernel's estimate of what can be allocated without swapping.
  It is an estimate, not a promise: other processes allocate too.
* Populating memory beyond a cgroup's limit does not fail with ENOMEM: the cgroup's
  OOM killer runs (measured here: ``MADV_POPULATE_WRITE`` of 200 MiB in a 100 MiB v1
  cgroup was SIGKILLed).  So the check must come before the reservation, and a
  reservation that loses a race dies at Setup, where the source keeps the VM.
* Guest RAM on a destination is registered with userfaultfd in MISSING mode and must
  stay missing until a page arrives, so it cannot itself be populated in advance
  (a populated page raises no fault and ``UFFDIO_COPY`` refuses it with EEXIST).
  The reservation is therefore a separate, populated anonymous mapping of the same
  size that is given back (``MADV_DONTNEED``) as guest pages are installed.

What the check guarantees, and what it does not:

* With a :class:`Reservation` held from Setup: the destination process owns (has
  faulted in, and has charged to its cgroup) as much memory as the guest's RAM,
  from before the first page until the last.  Memory only moves from the
  reservation to the guest, one chunk behind the installs, so the migration itself
  never needs memory it does not already hold: it cannot be the allocation that
  runs the host or the cgroup out.  A race lost *while reserving* OOM-kills the
  receiver during Setup, where the migration fails before the commit and the VM
  keeps running on the source.
* Holding memory does not stop the OOM killer from *choosing* the receiver when
  someone else runs the host or the cgroup out: it picks the largest process, which
  is the receiver (measured in a v1 memory cgroup: a receiver holding 130 MiB and a
  100 MiB newcomer in 200 MiB; the receiver was killed).  :class:`OomShield` sets the
  process's ``oom_score_adj`` to -1000 while it holds the only copy of a VM, so the
  OOM killer picks someone else; that needs CAP_SYS_RESOURCE (a systemd unit can
  set ``OOMScoreAdjust=-1000`` instead).
* Pages installed as zero pages take no memory until the guest writes them; their
  share of the reservation is held until the migration completes, then given back.
  After completion the VM is like any other process: it owns what it has touched,
  and what it touches later comes from the host like any allocation.
* Without a reservation (the check alone) nothing is held: it is a point-in-time
  answer that refuses a guest that cannot fit now.
* Swap, ``memory.memsw.*``/``memory.swap.max``, ``memory.min``/``low`` protection,
  NUMA placement and KSM are not considered.  With swap, reserved pages may be
  swapped out and the reservation then holds swap, not RAM.
* Hugetlb backing is checked against free, unreserved 2 MiB huge pages and the
  hugetlb cgroup; hugetlb memory is reserved by the kernel itself when it is mapped
  without ``MAP_NORESERVE`` (the reservation of this module is for 4 KiB memory).
"""

from __future__ import annotations

import errno
import mmap
import threading
from dataclasses import dataclass

from migrated.errors import InsufficientMemory
from migrated.kernel import Backing

from .hostmem import HUGE_PAGE_BYTES, HostMemory, MemoryBudget, MiB
from .hostmem import mib_text as _mib

__all__ = [
    "DEFAULT_HEADROOM_BYTES",
    "Admission",
    "HostMemory",
    "MemoryBudget",
    "OomShield",
    "Reservation",
    "admit",
    "assess",
    "reserve",
]

#: What a receiving process needs beyond guest RAM while a migration runs (staging
#: buffers, bitmaps, the interpreter's growth).  Measured: 35 MB for a 4 GiB guest.
DEFAULT_HEADROOM_BYTES = 64 * MiB
_MADV_POPULATE_WRITE = 23  # Linux 5.14; not exported by Python 3.11's mmap module


@dataclass(frozen=True)
class Admission:
    """The answer for one guest: every budget that applies, the tightest first."""

    guest_bytes: int
    headroom_bytes: int
    backing: Backing
    budgets: tuple[MemoryBudget, ...]
    #: cgroups this process is in but cannot read (see HostMemory.hidden_cgroups):
    #: their limits were not checked.  Callers should log it as a warning.
    unchecked: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.budgets)

    @property
    def binding(self) -> MemoryBudget | None:
        """The budget with the smallest margin (the first to fail), or None."""
        if not self.budgets:
            return None
        return min(self.budgets, key=lambda b: b.available_bytes - b.needed_bytes)

    def describe(self) -> str:
        lines = [
            f"{_mib(self.guest_bytes)} guest ({self.backing.value}) + "
            f"{_mib(self.headroom_bytes)} headroom:"
        ]
        for u in self.unchecked:
            lines.append(f"  ?     {u}: not visible here (/sys/fs/cgroup hidden?), not checked")
        for b in self.budgets:
            mark = "ok" if b.ok else "SHORT"
            lines.append(
                f"  {mark:5} {b.limit}: needs {_mib(b.needed_bytes)}, available "
                f"{_mib(b.available_bytes)} ({b.detail})"
            )
        return "\n".join(lines)


# -- the check ----------------------------------------------------------------------------


def assess(
    guest_bytes: int,
    backing: Backing | str = Backing.ANONYMOUS,
    *,
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
    host: HostMemory | None = None,
) -> Admission:
    """Every budget that applies to a guest of ``guest_bytes`` with ``backing``.
    Never raises for a too-large guest (see :func:`admit`); OSError if /proc cannot
    be read."""
    backing = Backing(backing)
    if guest_bytes < 0 or headroom_bytes < 0:
        raise ValueError("guest_bytes and headroom_bytes must not be negative")
    host = host or HostMemory()
    if backing is Backing.HUGETLB:
        huge = -(-guest_bytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        budgets = host.hugetlb_budgets(huge) + host.memory_budgets(headroom_bytes)
    else:
        budgets = host.memory_budgets(guest_bytes + headroom_bytes)
    budgets.sort(key=lambda b: b.available_bytes - b.needed_bytes)
    return Admission(
        guest_bytes, headroom_bytes, backing, tuple(budgets), tuple(host.hidden_cgroups())
    )


def admit(
    guest_bytes: int,
    backing: Backing | str = Backing.ANONYMOUS,
    *,
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
    host: HostMemory | None = None,
    what: str = "the guest",
) -> Admission:
    """Check that this host can hold ``guest_bytes`` of guest RAM now.

    Returns the :class:`Admission` when every budget suffices.  Raises
    :class:`InsufficientMemory` naming the needed and available bytes and the
    limit that binds (its hint says how to raise that limit); ``what`` names the
    guest in the message (``"VM db1"``)."""
    a = assess(guest_bytes, backing, headroom_bytes=headroom_bytes, host=host)
    short = [b for b in a.budgets if not b.ok]
    if not short:
        return a
    b = short[0]
    others = "".join(f"; also short: {o.limit}" for o in short[1:])
    raise InsufficientMemory(
        f"this host cannot hold {what}: it needs {_mib(b.needed_bytes)} "
        f"({_mib(guest_bytes)} of {Backing(backing).value} guest RAM + "
        f"{_mib(headroom_bytes)} headroom) but {b.limit} leaves "
        f"{_mib(b.available_bytes)} ({b.detail}){others}",
        hint=b.hint,
    )


# -- the reservation ----------------------------------------------------------------------


class Reservation:
    """Populated anonymous memory held for a guest whose RAM is still arriving.

    Created by :func:`reserve`.  :meth:`release` gives back as much as the guest has
    just taken (call it after pages with data are installed); it frees whole
    ``chunk_bytes`` from the top, so the process holds at most one chunk more than
    the reservation's size.  :meth:`close` gives back everything (at completion or
    failure); it is idempotent.  Thread-safe: an installer thread may release while
    the event loop reads :attr:`held_bytes`.
    """

    def __init__(self, nbytes: int, *, chunk_bytes: int = 2 * MiB) -> None:
        page = mmap.PAGESIZE
        self.nbytes = -(-nbytes // page) * page
        self.chunk_bytes = max(page, chunk_bytes // page * page)
        self._lock = threading.Lock()
        self._owed = 0
        self._map: mmap.mmap | None = None
        self._held = 0
        if self.nbytes == 0:
            return
        try:
            self._map = mmap.mmap(
                -1,
                self.nbytes,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError as exc:
            raise InsufficientMemory(
                f"cannot reserve {_mib(self.nbytes)} for the guest: mmap failed: {exc}",
                hint="free memory on this host or choose a destination with more memory",
            ) from exc
        try:
            _populate(self._map, self.nbytes)
        except OSError as exc:
            self._map.close()
            self._map = None
            raise InsufficientMemory(
                f"cannot reserve {_mib(self.nbytes)} for the guest: populating failed: {exc}",
                hint="free memory on this host or choose a destination with more memory",
            ) from exc
        self._held = self.nbytes

    @property
    def held_bytes(self) -> int:
        return self._held

    def release(self, nbytes: int) -> int:
        """The guest took ``nbytes`` more: give back that much (in whole chunks; the
        remainder is carried to the next call).  Returns the bytes freed now."""
        if nbytes <= 0:
            return 0
        with self._lock:
            if self._map is None:
                return 0
            self._owed += nbytes
            n = (
                self._held
                if self._owed >= self._held
                else (self._owed // self.chunk_bytes * self.chunk_bytes)
            )
            if n <= 0:
                return 0
            self._map.madvise(mmap.MADV_DONTNEED, self._held - n, n)
            self._held -= n
            self._owed = 0 if self._held == 0 else self._owed - n
            return n

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                self._map.close()
                self._map = None
            self._held = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _populate(m: mmap.mmap, nbytes: int) -> None:
    """Fault every page in for writing (charged to our cgroup now)."""
    try:
        m.madvise(_MADV_POPULATE_WRITE)
        return
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a kernel older than 5.14
            raise
    view = memoryview(m)
    try:
        npages = nbytes // mmap.PAGESIZE
        view[:: mmap.PAGESIZE] = b"\1" * npages
    finally:
        view.release()


def reserve(
    guest_bytes: int,
    backing: Backing | str = Backing.ANONYMOUS,
    *,
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
    host: HostMemory | None = None,
    what: str = "the guest",
) -> Reservation:
    """:func:`admit`, then hold the guest's RAM (see :class:`Reservation`).

    For hugetlb backing nothing is populated here (returns an empty reservation):
    mapping the guest's huge pages without ``MAP_NORESERVE`` reserves them in the
    kernel.  Raises :class:`InsufficientMemory` when the check fails or the memory
    cannot be taken."""
    admit(guest_bytes, backing, headroom_bytes=headroom_bytes, host=host, what=what)
    if Backing(backing) is Backing.HUGETLB:
        return Reservation(0)
    return Reservation(guest_bytes)


class OomShield:
    """While held, the OOM killer never picks this process (``oom_score_adj`` -1000).

    For the stretch in which this process holds the only complete copy of a VM (the
    destination from Setup, the source after the commit).  :meth:`close` restores
    the previous value and is idempotent.  Lowering the value needs
    CAP_SYS_RESOURCE: without it :attr:`active` is False and nothing changed (a
    systemd unit can set ``OOMScoreAdjust=`` instead).
    """

    def __init__(self, score: int = -1000, *, path: str = "/proc/self/oom_score_adj") -> None:
        self.path = path
        self.active = False
        self._previous: str | None = None
        try:
            with open(path) as f:
                self._previous = f.read().strip()
            with open(path, "w") as f:
                f.write(str(score))
        except PermissionError:
            return
        self.active = True

    def close(self) -> None:
        if not self.active or self._previous is None:
            return
        with open(self.path, "w") as f:
            f.write(self._previous)
        self.active = False

    def __enter__(self) -> OomShield:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
