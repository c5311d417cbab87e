"""userfaultfd: missing-page faults of guest RAM delivered to userspace.

Facts we rely on:

* The fd comes from /dev/userfaultfd (USERFAULTFD_IOC_NEW) or the userfaultfd(2)
  syscall.  We never ask for UFFD_USER_MODE_ONLY: it would hide the faults KVM takes
  inside the kernel while it accesses guest memory, and those are the ones that matter.
* After UFFDIO_REGISTER (MISSING mode) any thread that touches a missing page of the
  range sleeps until someone installs the page with UFFDIO_COPY or UFFDIO_ZEROPAGE
  (and wakes it, unless DONTWAKE was asked, then UFFDIO_WAKE).  The thread that reads
  this fd must never touch guest memory itself, or it would wait for itself.
* UFFDIO_COPY stops at a page that is already present and fails with EEXIST, with
  ``copy`` holding the bytes installed before it (or -EEXIST when none).  That is a
  normal race (the page was installed by another path), reported as ALREADY_PRESENT.
  EAGAIN means the mm changed under the copy; ``copy`` says how far it got: retry.
* With UFFD_FEATURE_THREAD_ID each fault message carries the faulting thread's id,
  which lets us measure per-vCPU blocktime.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass
from typing import Any

from ._util import ffi, ioctl, lib, raise_errno

__all__ = ["CopyResult", "FaultEvent", "UffdEventKind", "UffdFeature", "Userfaultfd"]


class UffdFeature(enum.IntFlag):
    PAGEFAULT_FLAG_WP = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
    EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
    MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
    SIGBUS = lib.UFFD_FEATURE_SIGBUS
    THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS


class UffdIoctl(enum.IntFlag):
    REGISTER = 1 << lib._UFFDIO_REGISTER
    UNREGISTER = 1 << lib._UFFDIO_UNREGISTER
    WAKE = 1 << lib._UFFDIO_WAKE
    COPY = 1 << lib._UFFDIO_COPY
    ZEROPAGE = 1 << lib._UFFDIO_ZEROPAGE
    API = 1 << lib._UFFDIO_API


class UffdEventKind(enum.IntEnum):
    PAGEFAULT = lib.UFFD_EVENT_PAGEFAULT
    FORK = lib.UFFD_EVENT_FORK
    REMAP = lib.UFFD_EVENT_REMAP
    REMOVE = lib.UFFD_EVENT_REMOVE
    UNMAP = lib.UFFD_EVENT_UNMAP


_NO_FEATURES = UffdFeature(0)


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One message read from the fd.  For PAGEFAULT: ``address`` (host virtual, not
    page-aligned unless EXACT_ADDRESS is off), ``write``, ``thread_id`` (0 without
    THREAD_ID).  For REMOVE/UNMAP: ``start``/``end`` of the range."""

    kind: UffdEventKind
    address: int = 0
    write: bool = False
    thread_id: int = 0
    start: int = 0
    end: int = 0


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What an install call did: bytes installed now, bytes found already present."""

    installed: int
    already_present: int


class Userfaultfd:
    """A userfaultfd with negotiated features.  ``close()`` is idempotent.

    ``available`` is what the kernel offers; ``features`` what this fd enabled.
    """

    def __init__(self, fd: int, features: UffdFeature, available: UffdFeature) -> None:
        self._fd = fd
        self.features = features
        self.available = available
        self._events = ffi.new("struct mig_uffd_event[]", 64)

    @staticmethod
    def _new_fd(nonblocking: bool) -> int:
        flags = lib.O_CLOEXEC | (lib.O_NONBLOCK if nonblocking else 0)
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            dev = -1
        if dev >= 0:
            try:
                return ioctl(dev, lib.USERFAULTFD_IOC_NEW, flags, "USERFAULTFD_IOC_NEW")
            except OSError:
                pass
            finally:
                os.close(dev)
        fd = int(lib.syscall(lib.SYS_userfaultfd, ffi.cast("int", flags)))
        if fd < 0:
            err = ffi.errno
            raise OSError(
                err,
                f"cannot create a userfaultfd: {os.strerror(err)}. As root, /dev/userfaultfd "
                "must be readable; otherwise set `sysctl vm.unprivileged_userfaultfd=1` or "
                "grant CAP_SYS_PTRACE",
            )
        return fd

    @classmethod
    def open(cls, want: UffdFeature = _NO_FEATURES, *, nonblocking: bool = True) -> Userfaultfd:
        """Open a userfaultfd and negotiate ``want`` (any subset the kernel lacks is
        dropped, not an error: check ``features``).  Raises OSError with a remedy
        when userfaultfd is not permitted."""
        # UFFDIO_API may only be called once per fd: probe on a throwaway fd first.
        probe = cls._new_fd(nonblocking)
        try:
            api = ffi.new("struct uffdio_api *")
            api.api = lib.UFFD_API
            ioctl(probe, lib.UFFDIO_API, api, "UFFDIO_API (probe)")
            available = UffdFeature(int(api.features) & sum(int(f) for f in UffdFeature))
        finally:
            os.close(probe)
        fd = cls._new_fd(nonblocking)
        try:
            api = ffi.new("struct uffdio_api *")
            api.api = lib.UFFD_API
            api.features = int(want & available)
            ioctl(fd, lib.UFFDIO_API, api, "UFFDIO_API")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, want & available, available)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("userfaultfd is closed")
        return self._fd

    def register(self, address: int, nbytes: int) -> UffdIoctl:
        """Register ``[address, address+nbytes)`` in MISSING mode; returns the ioctls
        the range supports.  Raises OSError (EINVAL: not page-aligned / not a VMA)."""
        reg = ffi.new("struct uffdio_register *")
        reg.range.start = address
        reg.range.len = nbytes
        reg.mode = lib.UFFDIO_REGISTER_MODE_MISSING
        ioctl(
            self.fileno(),
            lib.UFFDIO_REGISTER,
            reg,
            f"UFFDIO_REGISTER({address:#x}, {nbytes:#x} bytes)",
        )
        return UffdIoctl(int(reg.ioctls) & sum(int(f) for f in UffdIoctl))

    def unregister(self, address: int, nbytes: int) -> None:
        rng = ffi.new("struct uffdio_range *")
        rng.start = address
        rng.len = nbytes
        ioctl(
            self.fileno(),
            lib.UFFDIO_UNREGISTER,
            rng,
            f"UFFDIO_UNREGISTER({address:#x}, {nbytes:#x} bytes)",
        )

    def copy(
        self, dst: int, src: Any, nbytes: int, *, wake: bool = True, page_size: int = 4096
    ) -> CopyResult:
        """Install ``nbytes`` at host address ``dst`` from ``src`` (a buffer object or
        an int address).  Pages already present are skipped and counted; every other
        failure raises OSError."""
        if not isinstance(src, int):
            src_ptr = ffi.from_buffer(src)
            if len(src_ptr) < nbytes:
                raise ValueError(f"copy source has {len(src_ptr)} bytes, need {nbytes}")
            src = int(ffi.cast("uintptr_t", src_ptr))
        c = ffi.new("struct uffdio_copy *")
        mode = 0 if wake else lib.UFFDIO_COPY_MODE_DONTWAKE
        done = present = 0
        while done < nbytes:
            c.dst = dst + done
            c.src = src + done
            c.len = nbytes - done
            c.mode = mode
            c.copy = 0
            rc = lib.ioctl(self._fd, ffi.cast("unsigned long", lib.UFFDIO_COPY), c)
            if rc == 0:
                done = nbytes
                break
            err = ffi.errno
            copied = max(int(c.copy), 0)
            if err == errno.EEXIST:
                done += copied
                done += page_size  # the page at dst+done is present: skip it
                present += page_size
            elif err == errno.EAGAIN:
                done += copied
            else:
                raise_errno(err, f"UFFDIO_COPY({dst + done:#x}, {nbytes - done:#x} bytes)")
        return CopyResult(nbytes - present, present)

    def zeropage(
        self, dst: int, nbytes: int, *, wake: bool = True, page_size: int = 4096
    ) -> CopyResult:
        """Install zero pages over ``[dst, dst+nbytes)``; present pages are skipped."""
        z = ffi.new("struct uffdio_zeropage *")
        mode = 0 if wake else lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        done = present = 0
        while done < nbytes:
            z.range.start = dst + done
            z.range.len = nbytes - done
            z.mode = mode
            z.zeropage = 0
            rc = lib.ioctl(self._fd, ffi.cast("unsigned long", lib.UFFDIO_ZEROPAGE), z)
            if rc == 0:
                break
            err = ffi.errno
            zeroed = max(int(z.zeropage), 0)
            if err == errno.EEXIST:
                done += zeroed + page_size
                present += page_size
            elif err == errno.EAGAIN:
                done += zeroed
            else:
                raise_errno(err, f"UFFDIO_ZEROPAGE({dst + done:#x}, {nbytes - done:#x} bytes)")
        return CopyResult(nbytes - present, present)

    def wake(self, address: int, nbytes: int) -> None:
        rng = ffi.new("struct uffdio_range *")
        rng.start = address
        rng.len = nbytes
        ioctl(self.fileno(), lib.UFFDIO_WAKE, rng, f"UFFDIO_WAKE({address:#x}, {nbytes:#x})")

    def read_events(self, max_events: int = 64) -> list[FaultEvent]:
        """Read the pending messages in one read(2) (non-blocking fd: [] when none).
        Raises OSError on failure."""
        n = lib.mig_uffd_read_events(self.fileno(), self._events, min(max_events, 64))
        if n < 0:
            raise_errno(-n, "read(userfaultfd)")
        out = []
        for i in range(n):
            e = self._events[i]
            kind = UffdEventKind(e.event)
            if kind is UffdEventKind.PAGEFAULT:
                out.append(
                    FaultEvent(
                        kind,
                        address=int(e.address),
                        write=bool(e.flags & lib.UFFD_PAGEFAULT_FLAG_WRITE),
                        thread_id=int(e.ptid),
                    )
                )
            else:
                out.append(
                    FaultEvent(kind, address=int(e.address), start=int(e.start), end=int(e.end))
                )
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
