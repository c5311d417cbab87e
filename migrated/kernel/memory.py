"""Guest RAM: an mmap'd host region handed to KVM and (on a destination) userfaultfd.

Facts we rely on:

* An anonymous private mapping reads as zero until first touched, and a page that was
  never touched (or was dropped with MADV_DONTNEED) is *missing*: once the range is
  registered with userfaultfd in MISSING mode, touching it raises a fault event
  instead of allocating a zero page.
* MADV_DONTNEED on a private anonymous range drops the pages at once; on a shared
  (memfd) mapping it only unmaps them from this process and the data stays in the
  file, so "discard" semantics need anonymous memory (or fallocate punch-hole).
* The memoryview returned by :attr:`GuestMemory.view` aliases guest RAM.  Any thread
  that touches a registered, missing page through it blocks until the page is
  installed; the thread that serves faults must therefore never use it.
* Transparent huge pages: memory that will be registered with userfaultfd keeps
  MADV_NOHUGEPAGE (THP under userfaultfd has surprised others, and UFFDIO_COPY
  installs 4 KiB pages anyway).  Memory that is never registered (a source's guest
  RAM) may ask for THP (``transparent_huge_pages=True``): the mapping is then aligned
  to 2 MiB and advised MADV_HUGEPAGE, as QEMU does for its RAM; the kernel still
  decides (``/sys/kernel/mm/transparent_hugepage/enabled``).
* hugetlbfs memory (Backing.HUGETLB) comes from the vm.nr_hugepages pool in 2 MiB
  pages.  Under userfaultfd a huge page is installed whole (UFFDIO_COPY of 2 MiB;
  hugetlbfs has no UFFDIO_ZEROPAGE), so its wire layout must use 2 MiB pages.
"""

from __future__ import annotations

import contextlib
import enum
import mmap as _mmap
import os

from ._util import check, ffi, lib, raise_errno

__all__ = ["Backing", "GuestMemory"]

PAGE_SIZE = _mmap.PAGESIZE
HUGE_PAGE_SIZE = 2 * 1024 * 1024


class Backing(enum.Enum):
    ANONYMOUS = "anonymous"  # MAP_PRIVATE | MAP_ANONYMOUS: the default, discard works
    MEMFD = "memfd"  # shared memfd: another process could map it
    HUGETLB = "hugetlb"  # anonymous 2 MiB hugetlbfs pages (needs vm.nr_hugepages)


class GuestMemory:
    """One contiguous mmap'd region of guest RAM.

    ``address`` is the host virtual address, ``nbytes`` its size and ``page_size`` the
    size of the host pages behind it (4 KiB, or 2 MiB for hugetlb).  ``close()`` is
    idempotent; using the object after it raises ValueError.
    """

    def __init__(self, address: int, nbytes: int, page_size: int, backing: Backing, fd: int):
        self.address = address
        self.nbytes = nbytes
        self.page_size = page_size
        self.backing = backing
        self._fd = fd
        self._view: memoryview | None = memoryview(ffi.buffer(ffi.cast("char *", address), nbytes))

    @classmethod
    def create(
        cls,
        nbytes: int,
        backing: Backing | str = Backing.ANONYMOUS,
        *,
        transparent_huge_pages: bool = False,
    ) -> GuestMemory:
        """Map ``nbytes`` of guest RAM.  ``transparent_huge_pages`` (anonymous backing
        only) asks for THP: only for memory that is never registered with
        userfaultfd.  Raises ValueError for a bad size or combination, OSError if the
        kernel refuses (ENOMEM; for hugetlb, no free huge pages)."""
        backing = Backing(backing)
        if transparent_huge_pages and backing is not Backing.ANONYMOUS:
            raise ValueError("transparent huge pages need anonymous guest memory")
        page_size = HUGE_PAGE_SIZE if backing is Backing.HUGETLB else PAGE_SIZE
        if nbytes <= 0 or nbytes % page_size:
            raise ValueError(
                f"guest memory size {nbytes} is not a positive multiple of {page_size}"
            )
        prot = lib.PROT_READ | lib.PROT_WRITE
        fd = -1
        if backing is Backing.MEMFD:
            fd = lib.memfd_create(b"migrated-guest-ram", lib.MFD_CLOEXEC)
            if fd < 0:
                raise_errno(ffi.errno, "memfd_create for guest RAM")
            if lib.ftruncate(fd, nbytes) < 0:
                err = ffi.errno
                os.close(fd)
                raise_errno(err, f"ftruncate guest RAM memfd to {nbytes} bytes")
            flags = lib.MAP_SHARED | lib.MAP_NORESERVE
        else:
            flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE
            if backing is Backing.HUGETLB:
                flags |= lib.MAP_HUGETLB
        slack = HUGE_PAGE_SIZE if transparent_huge_pages else 0
        ptr = lib.mmap(ffi.NULL, nbytes + slack, prot, flags, fd, 0)
        if ptr == ffi.cast("void *", -1):
            err = ffi.errno
            if fd >= 0:
                os.close(fd)
            raise_errno(err, f"mmap {nbytes} bytes of {backing.value} guest RAM")
        address = int(ffi.cast("uintptr_t", ptr))
        if transparent_huge_pages:
            # Huge pages need 2 MiB-aligned ranges: trim the mapping to the aligned part.
            start = (address + HUGE_PAGE_SIZE - 1) & ~(HUGE_PAGE_SIZE - 1)
            if start > address:
                lib.munmap(ptr, start - address)
            if address + slack > start:
                lib.munmap(ffi.cast("void *", start + nbytes), address + slack - start)
            address = start
            ptr = ffi.cast("void *", address)
            lib.madvise(ptr, nbytes, lib.MADV_HUGEPAGE)
        elif backing is not Backing.HUGETLB:
            # Transparent huge pages under userfaultfd have surprised others (a guest
            # triple fault in Cloud Hypervisor); keep 4 KiB granularity on purpose.
            lib.madvise(ptr, nbytes, lib.MADV_NOHUGEPAGE)
        return cls(address, nbytes, page_size, backing, fd)

    @property
    def view(self) -> memoryview:
        """A writable memoryview of all of guest RAM (see the module notes)."""
        if self._view is None:
            raise ValueError("guest memory is closed")
        return self._view

    @property
    def closed(self) -> bool:
        return self._view is None

    def discard(self, offset: int, nbytes: int) -> None:
        """MADV_DONTNEED ``[offset, offset+nbytes)``: the pages become missing again."""
        self._check_range(offset, nbytes)
        if lib.madvise(ffi.cast("void *", self.address + offset), nbytes, lib.MADV_DONTNEED) < 0:
            raise_errno(ffi.errno, f"madvise(MADV_DONTNEED) on guest RAM +{offset:#x}")

    def discard_marked(self, bitmap: bytearray | memoryview, first_bit: int = 0) -> int:
        """MADV_DONTNEED every page whose bit is set: bit ``first_bit + i`` of
        ``bitmap`` (LSB first) stands for page ``i`` of this memory.  Returns the
        number of pages dropped; one madvise per run, no Python work per page."""
        if self._view is None:
            raise ValueError("guest memory is closed")
        npages = self.nbytes // self.page_size
        if len(bitmap) * 8 < first_bit + npages:
            raise ValueError(
                f"bitmap of {len(bitmap)} bytes does not cover pages "
                f"{first_bit}..{first_bit + npages}"
            )
        return check(
            lib.mig_discard_bitmap(
                ffi.cast("uint8_t *", self.address),
                npages,
                self.page_size,
                ffi.from_buffer(bitmap),
                first_bit,
            ),
            "madvise(MADV_DONTNEED) of discarded guest pages",
        )

    def _check_range(self, offset: int, nbytes: int) -> None:
        if self._view is None:
            raise ValueError("guest memory is closed")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.nbytes or offset % self.page_size:
            raise ValueError(
                f"range +{offset:#x}..+{offset + nbytes:#x} is outside guest RAM "
                f"of {self.nbytes:#x} bytes or not page-aligned"
            )

    def close(self) -> None:
        if self._view is None:
            return
        # Slices still alive keep the export; they must not be used after close.
        with contextlib.suppress(BufferError):
            self._view.release()
        self._view = None
        lib.munmap(ffi.cast("void *", self.address), self.nbytes)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
