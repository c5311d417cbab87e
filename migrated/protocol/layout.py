"""Guest memory layout: the frame of reference for every page range on the wire.

A :class:`MemoryLayout` is an ordered tuple of :class:`MemoryRegion` s.  Pages are
numbered by a *global page index*: region 0's pages come first (0 ..
``region0.npages - 1``), then region 1's, and so on.  The received bitmap of the
recovery handshake and the engines' page bitmaps use this numbering.

Contract for wire ranges: a range ``(gpa, npages)`` is valid when ``gpa`` is aligned
to the page size of the region that contains it, ``npages >= 1`` and the whole range
lies inside that *one* region.  :meth:`MemoryLayout.check_range` raises
:class:`~migrated.errors.RemoteProtocolError` (code ``"bad-range"``) otherwise; the
connection calls it before it hands any page event or payload to its caller.

Limits (hostile-peer bounds): at most :data:`MAX_REGIONS` regions, page sizes are
powers of two from 4 KiB to 1 GiB, regions are page-aligned, non-empty, below
2**64 and do not overlap, and there are at most 2**32 pages in all.  Construction
raises ``ValueError`` on a bad layout; the codec turns that into
``RemoteProtocolError`` (code ``"bad-layout"``) for layouts that arrive from the peer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from migrated.errors import RemoteProtocolError

MAX_REGIONS = 64
#: At most 2**32 pages in all (16 TiB of 4 KiB pages), so a received bitmap is ≤ 512 MiB.
MAX_TOTAL_PAGES = 1 << 32
MIN_PAGE_SIZE = 4096
MAX_PAGE_SIZE = 1 << 30
_GPA_LIMIT = 1 << 64


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One contiguous range of guest-physical memory with a single page size.

    ``gpa`` and ``nbytes`` are bytes; both are multiples of ``page_size``.
    """

    gpa: int
    nbytes: int
    page_size: int

    @property
    def npages(self) -> int:
        return self.nbytes // self.page_size

    @property
    def end_gpa(self) -> int:
        """First byte after the region."""
        return self.gpa + self.nbytes

    def validate(self) -> None:
        """Raise ``ValueError`` naming the problem if the region is not well formed."""
        for name in ("gpa", "nbytes", "page_size"):
            value = getattr(self, name)
            if type(value) is not int:
                raise ValueError(f"region {name} must be an int, got {type(value).__name__}")
        ps = self.page_size
        if ps < MIN_PAGE_SIZE or ps > MAX_PAGE_SIZE or ps & (ps - 1):
            raise ValueError(f"page_size {ps} is not a power of two between 4 KiB and 1 GiB")
        if self.nbytes <= 0:
            raise ValueError(f"region at gpa {self.gpa:#x} has size {self.nbytes} (must be > 0)")
        if self.gpa < 0 or self.end_gpa > _GPA_LIMIT:
            raise ValueError(f"region at gpa {self.gpa:#x} lies outside the 64-bit space")
        if self.gpa % ps or self.nbytes % ps:
            raise ValueError(
                f"region at gpa {self.gpa:#x} size {self.nbytes} is not aligned to "
                f"its page size {ps}"
            )


@dataclass(frozen=True, slots=True)
class MemoryLayout:
    """Validated, ordered guest memory regions.  Raises ``ValueError`` if invalid.

    Regions keep the order given (that order defines global page indices); they must
    not overlap.  ``total_pages`` is the sum of the regions' page counts.
    """

    regions: tuple[MemoryRegion, ...]
    # Derived lookup tables; not part of equality.  _first_index[i] is the global page
    # index of region i's first page.
    _first_index: tuple[int, ...] = field(init=False, repr=False, compare=False)
    # (start gpa, end gpa, page size) per region, for the hot range check.
    _spans: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)
    total_pages: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        regions = self.regions
        if type(regions) is not tuple:
            raise ValueError("regions must be a tuple of MemoryRegion")
        if not 1 <= len(regions) <= MAX_REGIONS:
            raise ValueError(f"a layout has 1..{MAX_REGIONS} regions, got {len(regions)}")
        for region in regions:
            if not isinstance(region, MemoryRegion):
                raise ValueError(f"not a MemoryRegion: {region!r}")
            region.validate()
        ordered = sorted(regions, key=lambda r: r.gpa)
        for i in range(1, len(ordered)):
            lower, upper = ordered[i - 1], ordered[i]
            if upper.gpa < lower.end_gpa:
                raise ValueError(f"regions at gpa {lower.gpa:#x} and {upper.gpa:#x} overlap")
        first: list[int] = []
        index = 0
        for region in regions:
            first.append(index)
            index += region.npages
        if index > MAX_TOTAL_PAGES:
            raise ValueError(f"layout has {index} pages, more than {MAX_TOTAL_PAGES}")
        object.__setattr__(self, "_first_index", tuple(first))
        spans = tuple((r.gpa, r.end_gpa, r.page_size) for r in regions)
        object.__setattr__(self, "_spans", spans)
        object.__setattr__(self, "total_pages", index)

    @property
    def bitmap_nbytes(self) -> int:
        """Size of a 1-bit-per-page bitmap over the layout: ceil(total_pages / 8)."""
        return (self.total_pages + 7) // 8

    def range_nbytes(self, gpa: int, npages: int) -> int:
        """Validate a wire range and return its size in bytes (npages * page_size).

        Raises RemoteProtocolError (code "bad-range") when the range is not page
        aligned, ``npages < 1``, or it is not entirely inside one region.
        """
        if type(gpa) is int and type(npages) is int and npages >= 1:
            for start, end, page_size in self._spans:
                if start <= gpa < end:
                    nbytes = npages * page_size
                    if not gpa & (page_size - 1) and gpa + nbytes <= end:
                        return nbytes
                    break
        raise RemoteProtocolError(
            f"page range gpa={gpa:#x} npages={npages} is not page-aligned inside one memory region",
            code="bad-range",
        )

    def check_range(self, gpa: int, npages: int) -> None:
        """Raise RemoteProtocolError (code "bad-range") unless the range is valid."""
        self.range_nbytes(gpa, npages)

    def region_of(self, gpa: int) -> MemoryRegion:
        """The region containing ``gpa``; RemoteProtocolError ("bad-range") if none."""
        for region in self.regions:
            if region.gpa <= gpa < region.end_gpa:
                return region
        raise RemoteProtocolError(f"gpa {gpa:#x} is in no memory region", code="bad-range")

    def page_index(self, gpa: int) -> int:
        """Global page index of the page containing ``gpa``.

        Raises RemoteProtocolError ("bad-range") if ``gpa`` is in no region.
        """
        for i, region in enumerate(self.regions):
            if region.gpa <= gpa < region.end_gpa:
                return self._first_index[i] + (gpa - region.gpa) // region.page_size
        raise RemoteProtocolError(f"gpa {gpa:#x} is in no memory region", code="bad-range")

    def gpa_of(self, page_index: int) -> int:
        """Guest-physical address of global page ``page_index``.

        Raises RemoteProtocolError ("bad-range") if the index is out of range.
        """
        if 0 <= page_index < self.total_pages:
            for i in range(len(self.regions) - 1, -1, -1):
                first = self._first_index[i]
                if page_index >= first:
                    region = self.regions[i]
                    return region.gpa + (page_index - first) * region.page_size
        raise RemoteProtocolError(
            f"page index {page_index} outside 0..{self.total_pages - 1}", code="bad-range"
        )


def bitmap_missing_runs(
    bitmap: bytes | bytearray | memoryview, npages: int
) -> list[tuple[int, int]]:
    """Runs of *clear* bits in an LSB-first bitmap, as ``(first_page_index, npages)``.

    Used by the source after recovery to find the pages the destination lacks.  Bits at
    or past ``npages`` are ignored.  Whole 0xFF bytes are skipped with ``bytes.find``
    style scans, so a mostly-received bitmap costs little; the result is a list of
    runs, never one object per page.
    """
    data = bytes(bitmap)
    runs: list[tuple[int, int]] = []
    run_start = -1
    nbytes = (npages + 7) // 8
    i = 0
    while i < nbytes:
        byte = data[i]
        if byte == 0xFF:
            if run_start >= 0:
                runs.append((run_start, i * 8 - run_start))
                run_start = -1
            # Skip a stretch of fully received bytes quickly.
            j = i + 1
            while j < nbytes and data[j] == 0xFF:
                j += 1
            i = j
            continue
        if byte == 0 and run_start >= 0:
            i += 1
            continue
        for bit in range(8):
            index = i * 8 + bit
            if index >= npages:
                break
            if byte >> bit & 1:
                if run_start >= 0:
                    runs.append((run_start, index - run_start))
                    run_start = -1
            elif run_start < 0:
                run_start = index
        i += 1
    if run_start >= 0:
        runs.append((run_start, npages - run_start))
    return runs
