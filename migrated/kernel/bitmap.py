"""Page bitmaps: one bit per page, LSB first within each byte (the KVM dirty-log
layout on little-endian hosts, and the wire layout of the received-pages bitmap).

Bookkeeping for a 64 GiB guest is 16 M pages: never one Python object per page.  The
loops live in C (``_native``); this class only bounds-checks and names things.

Facts we rely on (concurrency): a bitmap may be shared, without a common lock, by the
C page loops (running with the GIL released) and Python code on other threads.  Every
C helper that changes bits does so with atomic byte/word operations (see
``csrc/bitmap.c``), so no change to one bit can undo a concurrent change to another,
and readers never see a torn byte.  A find-then-set decision is not atomic as a whole:
use :meth:`PageBitmap.claim`, which sets bits and reports the ones *this* call changed,
wherever two threads may set the same pages.  ``bm[i]`` reads one byte (never torn).
"""

from __future__ import annotations

from collections.abc import Iterator

from ._util import ffi, lib

__all__ = ["PageBitmap", "find_zero_pages", "page_is_zero"]

_CLAIM_STEP = 1 << 16  # pages per C call of claim(): bounds its run buffer


class PageBitmap:
    """A fixed-size bitmap of ``nbits`` pages backed by a bytearray (``.data``)."""

    __slots__ = ("_c", "data", "nbits")

    def __init__(self, nbits: int, data: bytearray | None = None) -> None:
        if nbits < 0:
            raise ValueError("negative bitmap size")
        nbytes = (nbits + 7) // 8
        if data is None:
            data = bytearray(nbytes)
        elif len(data) < nbytes:
            raise ValueError(f"bitmap data has {len(data)} bytes, {nbits} bits need {nbytes}")
        self.nbits = nbits
        self.data = data
        self._c = ffi.from_buffer(data)

    @classmethod
    def from_bytes(cls, nbits: int, raw: bytes | bytearray | memoryview) -> PageBitmap:
        """Copy ``raw`` into a new bitmap; bits past ``nbits`` are cleared."""
        nbytes = (nbits + 7) // 8
        if len(raw) < nbytes:
            raise ValueError(f"bitmap of {len(raw)} bytes is too short for {nbits} pages")
        bm = cls(nbits, bytearray(raw[:nbytes]))
        if nbits % 8:
            bm.data[-1] &= (1 << (nbits % 8)) - 1
        return bm

    def _check(self, start: int, n: int) -> None:
        if start < 0 or n < 0 or start + n > self.nbits:
            raise IndexError(f"pages {start}..{start + n} outside bitmap of {self.nbits}")

    def __len__(self) -> int:
        return self.nbits

    def __getitem__(self, i: int) -> bool:
        self._check(i, 1)
        return bool(self.data[i >> 3] >> (i & 7) & 1)

    def set(self, start: int, n: int = 1) -> None:
        self._check(start, n)
        lib.mig_bitmap_set_range(self._c, start, n, 1)

    def clear(self, start: int, n: int = 1) -> None:
        self._check(start, n)
        lib.mig_bitmap_set_range(self._c, start, n, 0)

    def fill(self) -> None:
        if self.nbits:
            lib.mig_bitmap_set_range(self._c, 0, self.nbits, 1)

    def count(self) -> int:
        return int(lib.mig_bitmap_count(self._c, self.nbits))

    def all_set(self) -> bool:
        return self.count() == self.nbits

    def find_run(self, start: int, value: bool = True, max_len: int = 0) -> tuple[int, int]:
        """First run of bits equal to ``value`` at or after ``start``, at most
        ``max_len`` long (0: unbounded).  Returns ``(index, length)`` or ``(-1, 0)``."""
        if start >= self.nbits:
            return -1, 0
        run_len = ffi.new("size_t *")
        i = lib.mig_bitmap_find_run(self._c, self.nbits, start, 1 if value else 0, max_len, run_len)
        return int(i), int(run_len[0])

    def runs(
        self, value: bool = True, max_len: int = 0, start: int = 0
    ) -> Iterator[tuple[int, int]]:
        """All runs of ``value`` from ``start`` on, each at most ``max_len`` long."""
        pos = start
        while True:
            i, n = self.find_run(pos, value, max_len)
            if i < 0:
                return
            yield i, n
            pos = i + n

    def runs_within(self, start: int, n: int, value: bool = True) -> list[tuple[int, int]]:
        """The runs of ``value`` inside ``[start, start+n)``, clipped to it."""
        self._check(start, n)
        out: list[tuple[int, int]] = []
        end, pos = start + n, start
        while pos < end:
            i, length = self.find_run(pos, value, end - pos)
            if i < 0 or i >= end:
                break
            length = min(length, end - i)
            out.append((i, length))
            pos = i + length
        return out

    def claim(self, start: int, n: int) -> list[tuple[int, int]]:
        """Atomically set bits ``[start, start+n)``; returns the runs ``(first, npages)``
        of bits that this call changed from 0 to 1 (the pages it now owns).  Safe
        against concurrent ``claim``/``set`` from other threads and the C loops."""
        self._check(start, n)
        out: list[tuple[int, int]] = []
        pos, end = start, start + n
        while pos < end:
            step = min(end - pos, _CLAIM_STEP)
            runs = ffi.new("uint64_t[]", 2 * (step // 2 + 2))
            nruns = ffi.new("uint32_t *")
            lib.mig_bitmap_claim(self._c, pos, step, runs, nruns)
            for k in range(nruns[0]):
                first, length = int(runs[2 * k]), int(runs[2 * k + 1])
                if out and out[-1][0] + out[-1][1] == first:
                    out[-1] = (out[-1][0], out[-1][1] + length)
                else:
                    out.append((first, length))
            pos += step
        return out

    def or_count_new(self, other: PageBitmap | bytes | bytearray) -> int:
        """``self |= other``; returns how many bits were newly set."""
        src = other.data if isinstance(other, PageBitmap) else other
        nbytes = min(len(self.data), len(src))
        return int(lib.mig_bitmap_or_count_new(self._c, ffi.from_buffer(src), nbytes))

    def andnot(self, other: PageBitmap | bytes | bytearray) -> None:
        """``self &= ~other``."""
        src = other.data if isinstance(other, PageBitmap) else other
        nbytes = min(len(self.data), len(src))
        lib.mig_bitmap_andnot(self._c, ffi.from_buffer(src), nbytes)

    def copy(self) -> PageBitmap:
        return PageBitmap(self.nbits, bytearray(self.data))


def find_zero_pages(
    address: int, npages: int, page_size: int, out: PageBitmap, first_bit: int = 0
) -> int:
    """Set bit ``first_bit + i`` of ``out`` for every all-zero page ``i`` of the
    ``npages`` pages at host address ``address``; return their count.  The caller
    guarantees the memory is readable (on a source: always)."""
    out._check(first_bit, npages)
    return int(
        lib.mig_find_zero_pages(
            ffi.cast("uint8_t *", address), npages, page_size, out._c, first_bit
        )
    )


def page_is_zero(address: int, page_size: int) -> bool:
    return bool(lib.mig_page_is_zero(ffi.cast("uint8_t *", address), page_size))
