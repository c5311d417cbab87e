"""The small C pieces the page loops stand on, against their references: msgpack's own
encoder for headers and object extents, and threads racing on one bitmap."""

from __future__ import annotations

import threading
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from migrated.kernel import PageBitmap
from migrated.kernel._util import ffi, lib
from migrated.kernel.pagefeed import msgpack_extent
from migrated.protocol import codec

U64 = st.integers(0, (1 << 64) - 1)
EDGES = st.sampled_from([0, 1, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32])


def c_header(zero: bool, gpa: int, npages: int, request_id: int) -> bytes:
    buf = ffi.new("uint8_t[]", 32)
    n = lib.mig_encode_page_header(buf, int(zero), gpa, npages, request_id)
    return bytes(ffi.buffer(buf, n))


@settings(max_examples=500, deadline=None)
@given(st.booleans(), st.one_of(U64, EDGES), st.one_of(U64, EDGES), st.one_of(U64, EDGES))
def test_headers_are_what_msgpack_writes(zero: bool, gpa: int, npages: int, rid: int) -> None:
    assert codec.PAGES_CODE == 6 and codec.BY_CODE[7].cls.__name__ == "ZeroPages"
    wire = [7, gpa, npages, rid] if zero else [6, gpa, npages, rid, None]
    assert c_header(zero, gpa, npages, rid) == msgpack.packb(wire, use_bin_type=True)


objects = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(1 << 63), (1 << 64) - 1),
        st.floats(allow_nan=False),
        st.text(max_size=40),
        st.binary(max_size=300),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=20), st.dictionaries(st.text(max_size=5), inner, max_size=6)
    ),
    max_leaves=40,
)


@settings(max_examples=500, deadline=None)
@given(objects, st.binary(max_size=20))
def test_extent_is_where_msgpack_stops(obj: Any, tail: bytes) -> None:
    packed = msgpack.packb(obj, use_bin_type=True)
    assert msgpack_extent(packed + tail) == len(packed)
    for cut in {0, 1, len(packed) // 2, len(packed) - 1}:
        if cut < len(packed):
            assert msgpack_extent(packed[:cut]) == 0, cut


def test_extent_of_invalid_and_huge_objects() -> None:
    assert msgpack_extent(b"\xc1") == -1
    assert msgpack_extent(b"\x91\xc1") == -1
    assert msgpack_extent(b"\xdd\xff\xff\xff\xff") == -1  # 4 G elements pending
    assert msgpack_extent(b"\xdb\x00\x01\x00\x00") == 0  # a 64 KiB string, not all here
    assert msgpack_extent(b"\xd7\x01" + bytes(8)) == 10  # fixext8


def test_racing_claims_give_every_page_to_exactly_one_thread() -> None:
    nbits = 50_000
    for _ in range(3):
        bm = PageBitmap(nbits)
        got: list[list[tuple[int, int]]] = [[], [], []]

        def claimer(k: int, runs: list[tuple[int, int]], bm: PageBitmap = bm) -> None:
            # Overlapping, unaligned ranges in different orders per thread.
            step = 37 + 11 * k
            starts = list(range(k, nbits, step))
            if k == 1:
                starts.reverse()
            for s in starts:
                runs.extend(bm.claim(s, min(step + 5, nbits - s)))

        threads = [threading.Thread(target=claimer, args=(k, got[k])) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pages = [p for runs in got for first, n in runs for p in range(first, first + n)]
        assert sorted(pages) == list(range(nbits))
        assert bm.count() == nbits


def test_concurrent_writers_of_the_same_bytes_lose_nothing() -> None:
    """Two threads OR (then AND-NOT) complementary bits into the same bytes at once,
    in C with the GIL released: a plain read-modify-write would lose updates."""
    nbytes = 1 << 18
    low, high = bytes([0x0F]) * nbytes, bytes([0xF0]) * nbytes
    for _ in range(20):
        bm = PageBitmap(nbytes * 8)
        counts = [0, 0]

        def orer(k: int, mask: bytes, bm: PageBitmap = bm, counts: list[int] = counts) -> None:
            counts[k] = bm.or_count_new(mask)

        ts = [threading.Thread(target=orer, args=(k, m)) for k, m in enumerate((low, high))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert counts == [nbytes * 4, nbytes * 4]
        assert bm.data == bytearray(b"\xff") * nbytes
        ts = [threading.Thread(target=bm.andnot, args=(m,)) for m in (low, high)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert bm.count() == 0
