"""Bitmap and zero-page C helpers against a pure-Python model."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrated.kernel import GuestMemory, PageBitmap, find_zero_pages


def model_runs(bits: list[bool], value: bool, max_len: int) -> list[tuple[int, int]]:
    out, i = [], 0
    while i < len(bits):
        if bits[i] == value:
            j = i
            while j < len(bits) and bits[j] == value and (not max_len or j - i < max_len):
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=300), st.booleans(), st.integers(0, 70))
def test_runs_match_model(bits: list[bool], value: bool, max_len: int) -> None:
    bm = PageBitmap(len(bits))
    for i, b in enumerate(bits):
        if b:
            bm.set(i)
    assert bm.count() == sum(bits)
    assert list(bm.runs(value, max_len)) == model_runs(bits, value, max_len)
    assert [bm[i] for i in range(len(bits))] == bits


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=200), st.data())
def test_runs_within_matches_model(bits: list[bool], data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(bits) - 1))
    n = data.draw(st.integers(0, len(bits) - start))
    bm = PageBitmap(len(bits))
    for i, b in enumerate(bits):
        if b:
            bm.set(i)
    for value in (True, False):
        got = bm.runs_within(start, n, value)
        want = [(start + i, k) for i, k in model_runs(bits[start : start + n], value, 0)]
        assert got == want


def test_ranges_or_andnot() -> None:
    a, b = PageBitmap(1000), PageBitmap(1000)
    a.set(3, 200)
    b.set(100, 400)
    assert a.or_count_new(b) == 297  # [203, 500) is new
    assert a.count() == 497
    a.andnot(b)
    assert list(a.runs()) == [(3, 97)]
    a.clear(3, 97)
    assert a.count() == 0
    with pytest.raises(IndexError):
        a.set(999, 2)


def test_find_zero_pages() -> None:
    with GuestMemory.create(64 * 4096) as mem:
        rng = random.Random(1)
        nonzero = set(rng.sample(range(64), 20))
        for p in nonzero:
            mem.view[p * 4096 + rng.randrange(4096)] = 1 + rng.randrange(255)
        out = PageBitmap(64)
        assert find_zero_pages(mem.address, 64, 4096, out) == 44
        assert {i for i in range(64) if not out[i]} == nonzero


def test_discard_marked_drops_exactly_the_set_pages() -> None:
    with GuestMemory.create(64 * 4096) as mem:
        mem.view[:] = b"\x11" * mem.nbytes
        bm = PageBitmap(10 + 64)  # pages of this memory start at bit 10
        for p in (0, 1, 2, 17, 40, 63):
            bm.set(10 + p)
        assert mem.discard_marked(bm.data, first_bit=10) == 6
        for p in range(64):
            expect = 0 if p in (0, 1, 2, 17, 40, 63) else 0x11
            assert mem.view[p * 4096] == expect and mem.view[p * 4096 + 4095] == expect
        with pytest.raises(ValueError, match="does not cover"):
            mem.discard_marked(bytearray(4))


def test_discard_marked_across_several_kernel_batches() -> None:
    """2500 separate runs: more than one batch of 1024 ranges for process_madvise (and
    the per-range madvise where the kernel refuses it); every run and nothing else."""
    npages = 3 * 2500 + 7
    with GuestMemory.create(npages * 4096) as mem:
        view = mem.view
        view[:] = b"\x22" * mem.nbytes
        bm = PageBitmap(npages)
        marked = set()
        for k in range(2500):  # runs of 1 or 2 pages with gaps between them
            first = 3 * k
            n = 1 + k % 2
            bm.set(first, n)
            marked.update(range(first, first + n))
        assert mem.discard_marked(bm.data) == len(marked)
        got = {p for p in range(npages) if view[p * 4096] == 0}
        assert got == marked
        assert all(view[p * 4096 + 4095] == (0 if p in marked else 0x22) for p in range(npages))
