"""The C receive path gives what the Connection alone gives, for any byte stream.

Each example builds a byte stream (valid fast frames, the same frames with wide
integers, frames only the Connection may judge, other messages, garbage, a cut at a
random place), sends it over a real socketpair in random pieces, and receives it twice:
once with :class:`AcceleratedReceiver` (C loop + Connection) into real memory, once
with a protocol Connection alone into a model.  Both must agree on the events, the
error (class, code and message), the received bitmap, the memory of every received
page, and the pages reported as newly installed (each exactly once).  With
userfaultfd, pages already received or already present are never changed.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from migrated.errors import ProtocolError
from migrated.kernel import (
    AcceleratedReceiver,
    GuestMemory,
    MappedRegion,
    PageBitmap,
    PageMap,
    Reason,
    Userfaultfd,
)
from migrated.protocol import MemoryLayout, MemoryRegion

from .pagestream_util import (
    HOOKS,
    PAGE,
    Model,
    Outcome,
    bitmap_set,
    build_stream,
    items,
    opened,
    pattern,
    reference,
    write_in_chunks,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
DIRECT_LAYOUT = MemoryLayout(
    (MemoryRegion(0, 8 * PAGE, PAGE), MemoryRegion(1 << 20, 4 * 2 * PAGE, 2 * PAGE))
)
UFFD_LAYOUT = MemoryLayout((MemoryRegion(0, 8 * PAGE, PAGE), MemoryRegion(1 << 20, 6 * PAGE, PAGE)))
OWNED = 0xA7  # seed of the content of pages the guest already owns


@contextlib.contextmanager
def guest(layout: MemoryLayout, uffd: bool) -> Iterator[tuple[list[GuestMemory], Any]]:
    mems = [GuestMemory.create(r.nbytes) for r in layout.regions]
    fd = Userfaultfd.open() if uffd else None
    try:
        if fd is not None:
            for m in mems:
                fd.register(m.address, m.nbytes)
        yield mems, fd
    finally:
        if fd is not None:
            for m in mems:
                with contextlib.suppress(OSError):
                    fd.unregister(m.address, m.nbytes)
            fd.close()
        for m in mems:
            m.close()


def page_bytes(layout: MemoryLayout, mems: list[GuestMemory], page: int) -> bytes:
    gpa = layout.gpa_of(page)
    i = layout.regions.index(layout.region_of(gpa))
    r = layout.regions[i]
    off = gpa - r.gpa
    return bytes(mems[i].view[off : off + r.page_size])


def accelerated(
    layout: MemoryLayout,
    stream: bytes,
    chunks: list[int],
    *,
    use_uffd: bool,
    pre_bits: set[int],
    pre_present: set[int],
    batch_nbytes: int,
    checksum: str | None = None,
) -> tuple[Outcome, PageBitmap, dict[int, bytes], list[tuple[int, int]], AcceleratedReceiver]:
    out = Outcome()
    with guest(layout, use_uffd) as (mems, uffd):
        bm = PageBitmap(layout.total_pages)
        pm = PageMap(
            [
                MappedRegion(r.gpa, r.nbytes, r.page_size, m.address)
                for r, m in zip(layout.regions, mems, strict=True)
            ],
            bm,
            uffd,
        )
        for page in sorted(pre_bits | pre_present):
            data = pattern(OWNED + page, PAGE)
            gpa = layout.gpa_of(page)
            host = pm.host_view(page, 1) if uffd is None else None
            if uffd is not None:
                addr = mems[layout.regions.index(layout.region_of(gpa))].address
                uffd.copy(addr + gpa - layout.region_of(gpa).gpa, data, PAGE)
            else:
                assert host is not None
                host[: len(data)] = data
            if page in pre_bits:
                bm.set(page)
        conn = opened(layout, checksum).dest
        a, b = socket.socketpair()
        writer = write_in_chunks(a, stream, chunks)
        rx = AcceleratedReceiver(b, conn, pm, HOOKS)
        runs: list[tuple[int, int]] = []
        try:
            for _ in range(10_000):
                r = rx.receive(batch_nbytes=batch_nbytes, timeout_s=10)
                runs += r.runs
                out.events += r.events
                assert r.reason is not Reason.IDLE, "the receiver waited 10 s for nothing"
                if r.reason is Reason.EOF:
                    break
        except ProtocolError as exc:
            out.record_error(exc)
        finally:
            rx.close()  # closes its dup of b: with b, the reading end is gone
            b.close()
            writer.join()
            a.close()
        if uffd is not None:
            for m in mems:
                uffd.unregister(m.address, m.nbytes)  # missing pages now read as zero
        memory = {p: page_bytes(layout, mems, p) for p in range(layout.total_pages)}
    return out, bm, memory, runs, rx


def note_event(text: str) -> None:
    with contextlib.suppress(InvalidArgument):  # outside a Hypothesis test
        event(text)


def check_same(
    layout: MemoryLayout,
    stream: bytes,
    chunks: list[int],
    *,
    use_uffd: bool,
    pre_bits: set[int],
    pre_present: set[int],
    batch_nbytes: int,
    checksum: str | None = None,
) -> AcceleratedReceiver:
    model = Model(layout, direct=not use_uffd)
    model.bits |= pre_bits
    model.present |= pre_present
    for page in pre_bits | pre_present:
        model.set_page(page, pattern(OWNED + page, PAGE))
    want = reference(layout, stream, chunks, model, checksum)
    got, bm, memory, runs, rx = accelerated(
        layout,
        stream,
        chunks,
        use_uffd=use_uffd,
        pre_bits=pre_bits,
        pre_present=pre_present,
        batch_nbytes=batch_nbytes,
        checksum=checksum,
    )
    note_event(
        f"C frames: {min(rx.loop.stats.frames, 3)}+, handbacks: {min(rx.loop.stats.handbacks, 2)}+"
    )
    note_event(f"error: {want.error[1] if want.error else None}")
    assert got.events == want.events
    assert got.error == want.error
    assert bitmap_set(bm) == model.bits
    for page in range(layout.total_pages):
        assert memory[page] == model.page(page), f"page {page} differs"
    reported = [p for first, n in runs for p in range(first, first + n)]
    assert len(reported) == len(set(reported)), "a page was reported installed twice"
    assert set(reported) == model.bits - pre_bits
    if use_uffd:
        for page in pre_bits | pre_present:  # never changed: the guest owns them
            assert memory[page] == pattern(OWNED + page, PAGE)
        for page in set(range(layout.total_pages)) - model.bits - pre_present:
            assert memory[page] == bytes(PAGE), f"page {page} was written, bit clear"
    return rx


streams = st.lists(items(DIRECT_LAYOUT), max_size=12)
chunking = st.lists(st.integers(1, 3 * PAGE), max_size=20)
batches = st.sampled_from([0, 1, 5 * PAGE, 1 << 20])


@FUZZ
@given(streams, chunking, batches, st.data())
def test_direct_mode_matches_the_connection(its: Any, chunks: Any, batch: int, data: Any) -> None:
    stream = build_stream(DIRECT_LAYOUT, its)
    cut = data.draw(st.one_of(st.none(), st.none(), st.integers(0, max(0, len(stream) - 1))))
    if cut is not None:
        stream = stream[:cut]
    check_same(
        DIRECT_LAYOUT,
        stream,
        chunks,
        use_uffd=False,
        pre_bits=set(),
        pre_present=set(),
        batch_nbytes=batch,
    )


@pytest.mark.uffd
@FUZZ
@given(st.lists(items(UFFD_LAYOUT), max_size=12), chunking, batches, st.data())
def test_uffd_mode_matches_the_connection(its: Any, chunks: Any, batch: int, data: Any) -> None:
    stream = build_stream(UFFD_LAYOUT, its)
    cut = data.draw(st.one_of(st.none(), st.none(), st.integers(0, max(0, len(stream) - 1))))
    if cut is not None:
        stream = stream[:cut]
    pages = st.sets(st.integers(0, UFFD_LAYOUT.total_pages - 1), max_size=5)
    pre_bits = data.draw(pages)
    pre_present = data.draw(pages) - pre_bits
    check_same(
        UFFD_LAYOUT,
        stream,
        chunks,
        use_uffd=True,
        pre_bits=pre_bits,
        pre_present=pre_present,
        batch_nbytes=batch,
    )


@FUZZ
@given(st.lists(items(DIRECT_LAYOUT), max_size=8), chunking)
def test_a_checksummed_connection_is_decoded_by_python(its: Any, chunks: Any) -> None:
    stream = build_stream(DIRECT_LAYOUT, its)
    rx = check_same(
        DIRECT_LAYOUT,
        stream,
        chunks,
        use_uffd=False,
        pre_bits=set(),
        pre_present=set(),
        batch_nbytes=0,
        checksum="xxh3",
    )
    assert rx.loop.stats.frames == 0


def test_byte_by_byte_delivery_hands_header_prefixes_back() -> None:
    """Every header arrives in 1-byte pieces: fast headers are assembled in C, the
    prefix of a non-fast one is handed back, and the results still agree."""
    from .pagestream_util import Item

    its = [
        Item("pages", (0, 2, 0)),
        Item("progress", (1, 2)),
        Item("zero", (4 * PAGE, 3, 7)),
        Item("raw", ([6, 0, 1, 0, 5], PAGE)),
    ]
    stream = build_stream(DIRECT_LAYOUT, its)
    rx = check_same(
        DIRECT_LAYOUT,
        stream,
        [1] * len(stream),
        use_uffd=False,
        pre_bits=set(),
        pre_present=set(),
        batch_nbytes=0,
    )
    assert rx.loop.stats.frames == 2  # the Pages and the ZeroPages frame
    assert rx.loop.stats.handbacks >= 2


def test_fast_frames_stay_in_c() -> None:
    """A stream of only fast frames never reaches the Connection."""
    from .pagestream_util import Item

    its = [Item("pages", (i * PAGE, 1, 0)) for i in range(8)]
    its += [Item("zero", ((1 << 20) + 2 * PAGE * i, 1, 0)) for i in range(4)]
    stream = build_stream(DIRECT_LAYOUT, its)
    rx = check_same(
        DIRECT_LAYOUT,
        stream,
        [],
        use_uffd=False,
        pre_bits=set(),
        pre_present=set(),
        batch_nbytes=0,
    )
    assert rx.loop.stats.frames == 12
    assert rx.python_frames == 0
    assert rx.loop.stats.handbacks == 0


def test_a_frame_with_more_new_runs_than_the_run_buffer_resumes_after_batch() -> None:
    """A ZeroPages frame over pages whose bits alternate yields ~8 K separate new runs:
    more than one call can report, so the loop returns BATCH inside the frame and
    resumes it; every page is reported once."""
    npages = 16384
    layout = MemoryLayout((MemoryRegion(0, npages * PAGE, PAGE),))
    from .pagestream_util import Item

    stream = build_stream(layout, [Item("zero", (0, npages, 0))])
    with guest(layout, uffd=False) as (mems, _):
        bm = PageBitmap(npages)
        for p in range(0, npages, 2):
            bm.set(p)
        pm = PageMap([MappedRegion(0, npages * PAGE, PAGE, mems[0].address)], bm)
        a, b = socket.socketpair()
        writer = write_in_chunks(a, stream, [])
        rx = AcceleratedReceiver(b, opened(layout).dest, pm, HOOKS)
        reasons, runs = [], []
        while True:
            r = rx.receive(batch_nbytes=0, timeout_s=10)
            reasons.append(r.reason)
            runs += r.runs
            if r.reason is Reason.EOF:
                break
        writer.join()
        assert reasons.count(Reason.BATCH) >= 1
        assert sorted(p for f, n in runs for p in range(f, f + n)) == list(range(1, npages, 2))
        assert bm.count() == npages and rx.loop.stats.frames == 1
        rx.close()
        a.close()
        b.close()
