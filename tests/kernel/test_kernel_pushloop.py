"""The C push loop over real sockets: its bytes are exactly what Connection.send writes
for the same frames, it sends every unsent page once, honours jumps, shares the sent
bitmap with a concurrent urgent path, and survives a peer that stops reading."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrated.engine.ram import GuestRam
from migrated.kernel import GuestMemory, MappedRegion, PageBitmap, PageMap, PushLoop, TxEvent
from migrated.protocol import NEED_DATA, MemoryLayout, MemoryRegion, Pages, ZeroPages

from .pagestream_util import PAGE, opened, pattern


@contextmanager
def source_ram(
    region_pages: list[int], zero: set[int]
) -> Iterator[tuple[list[GuestMemory], MemoryLayout]]:
    """Regions of the given sizes at 1 MiB apart; page p (global) holds a pattern unless
    it is in ``zero``."""
    mems = [GuestMemory.create(n * PAGE) for n in region_pages]
    try:
        layout = MemoryLayout(
            tuple(MemoryRegion(i << 20, n * PAGE, PAGE) for i, n in enumerate(region_pages))
        )
        page = 0
        for m, n in zip(mems, region_pages, strict=True):
            for k in range(n):
                if page not in zero:
                    m.view[k * PAGE : (k + 1) * PAGE] = pattern(page + 3, PAGE)
                page += 1
        yield mems, layout
    finally:
        for m in mems:
            m.close()


def pagemap(mems: list[GuestMemory], layout: MemoryLayout, sent: PageBitmap) -> PageMap:
    return PageMap(
        [
            MappedRegion(r.gpa, r.nbytes, r.page_size, m.address)
            for r, m in zip(layout.regions, mems, strict=True)
        ],
        sent,
    )


def push_all(
    loop: PushLoop, sock: socket.socket, batch_nbytes: int = 0
) -> tuple[bytes, list[TxEvent]]:
    """Run the loop to DONE while a thread reads everything from ``sock`` (the peer of
    the loop's socket), then end the stream."""
    got = bytearray()

    def read() -> None:
        while chunk := sock.recv(1 << 20):
            got.extend(chunk)

    t = threading.Thread(target=read)
    t.start()
    events = []
    while True:
        ev = loop.run(batch_nbytes=batch_nbytes, timeout_s=10)
        events.append(ev)
        assert ev is not TxEvent.IDLE
        if ev is TxEvent.DONE:
            break
        assert not loop.pending
    with socket.fromfd(loop.fd, socket.AF_UNIX, socket.SOCK_STREAM) as dup:
        dup.shutdown(socket.SHUT_WR)
    t.join()
    return bytes(got), events


def decode(layout: MemoryLayout, stream: bytes) -> list[Any]:
    conn = opened(layout, max_frame=16 << 20).dest
    if not stream:
        return []
    conn.receive_data(stream)
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
    assert not conn.in_payload
    return out


def reencode(layout: MemoryLayout, events: list[Any]) -> bytes:
    src = opened(layout, max_frame=16 << 20).source
    return b"".join(bytes(b) for e in events for b in src.send(e))


def check_stream(
    layout: MemoryLayout,
    stream: bytes,
    unsent: set[int],
    zero: set[int],
    max_pages: int,
) -> list[Any]:
    events = decode(layout, stream)
    assert reencode(layout, events) == stream, "not byte-identical to Connection.send"
    seen: list[int] = []
    for ev in events:
        assert type(ev) in (Pages, ZeroPages) and ev.request_id == 0
        assert ev.npages <= max_pages
        first = layout.page_index(ev.gpa)
        pages = list(range(first, first + ev.npages))
        seen += pages
        if type(ev) is ZeroPages:
            assert set(pages) <= zero
        else:
            assert not set(pages) & zero
            assert bytes(ev.data) == b"".join(pattern(p + 3, PAGE) for p in pages)
    assert sorted(seen) == sorted(unsent), "every unsent page exactly once"
    return events


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=3),
    st.integers(1, 17),
    st.data(),
)
def test_push_is_byte_identical_and_sends_every_unsent_page_once(
    region_pages: list[int], max_pages: int, data: Any
) -> None:
    total = sum(region_pages)
    zero = data.draw(st.sets(st.integers(0, total - 1)))
    presend = data.draw(st.sets(st.integers(0, total - 1)))
    with source_ram(region_pages, zero) as (mems, layout):
        sent = PageBitmap(total)
        for p in presend:
            sent.set(p)
        a, b = socket.socketpair()
        with PushLoop(a.fileno(), pagemap(mems, layout, sent), max_frame_pages=max_pages) as loop:
            stream, _ = push_all(loop, b, batch_nbytes=data.draw(st.sampled_from([0, 1, 3 * PAGE])))
            assert loop.stats.claimed_pages == total - len(presend)
        check_stream(layout, stream, set(range(total)) - presend, zero, max_pages)
        assert sent.count() == total
        a.close()
        b.close()


def test_push_equals_the_python_pusher_for_one_region() -> None:
    """Same frames, same order, same bytes as BulkPusher's loop over GuestRam.frames."""
    npages, max_pages = 300, 32
    zero = set(range(40, 90)) | {5, 7, 299}
    with source_ram([npages], zero) as (mems, layout):
        sent = PageBitmap(npages)
        sent.set(100, 20)
        ram = GuestRam([(0, mems[0])])
        src = opened(layout, max_frame=16 << 20).source
        want, ref_sent, scratch, cursor = bytearray(), sent.copy(), PageBitmap(max_pages), 0
        while True:
            page, n = ref_sent.find_run(cursor, False, max_pages)
            if page < 0:
                break
            ref_sent.set(page, n)
            cursor = page + n
            for frame in ram.frames(page, n, max_pages, scratch):
                want += b"".join(bytes(x) for x in src.send(frame))
        a, b = socket.socketpair()
        with PushLoop(a.fileno(), pagemap(mems, layout, sent), max_frame_pages=max_pages) as loop:
            stream, events = push_all(loop, b, batch_nbytes=64 * PAGE)
        assert stream == bytes(want)
        assert TxEvent.BATCH in events
        a.close()
        b.close()


def test_jump_moves_the_cursor_and_the_push_wraps_around() -> None:
    with source_ram([64], set()) as (mems, layout):
        sent = PageBitmap(64)
        a, b = socket.socketpair()
        with PushLoop(a.fileno(), pagemap(mems, layout, sent), max_frame_pages=8) as loop:
            loop.jump(40)
            stream, _ = push_all(loop, b)
        firsts = [layout.page_index(e.gpa) for e in decode(layout, stream)]
        assert firsts == [40, 48, 56, 0, 8, 16, 24, 32]
        a.close()
        b.close()


def mark(sent: PageBitmap, seed: int, stop: threading.Event, out: list[tuple[int, int]]) -> None:
    """The urgent path: claims short runs at pseudo-random places until stopped."""
    n, p = len(sent), seed
    while not stop.is_set():
        p = (p * 1103515245 + 12345) % n
        out.extend(sent.claim(p, min(1 + p % 5, n - p)))


def test_a_concurrent_urgent_path_and_the_loop_never_both_claim_a_page() -> None:
    npages = 4096
    with source_ram([npages], set(range(0, npages, 3))) as (mems, layout):
        for attempt in range(5):
            sent = PageBitmap(npages)
            urgent: list[tuple[int, int]] = []
            stop = threading.Event()
            t = threading.Thread(target=mark, args=(sent, attempt, stop, urgent))
            a, b = socket.socketpair()
            with PushLoop(a.fileno(), pagemap(mems, layout, sent), max_frame_pages=16) as loop:
                t.start()
                stream, _ = push_all(loop, b, batch_nbytes=16 * PAGE)
                stop.set()
                t.join()
            by_loop = [
                p
                for e in decode(layout, stream)
                for p in range(layout.page_index(e.gpa), layout.page_index(e.gpa) + e.npages)
            ]
            by_urgent = [p for first, n in urgent for p in range(first, first + n)]
            assert len(set(by_loop)) == len(by_loop)
            assert not set(by_loop) & set(by_urgent)
            assert sorted(by_loop + by_urgent) == list(range(npages))
            a.close()
            b.close()


def test_a_peer_that_stops_reading_makes_the_loop_idle_then_it_resumes() -> None:
    npages = 2048  # 8 MiB: more than the socket buffers hold
    with source_ram([npages], set()) as (mems, layout):
        sent = PageBitmap(npages)
        a, b = socket.socketpair()
        with PushLoop(a.fileno(), pagemap(mems, layout, sent), max_frame_pages=64) as loop:
            assert loop.run(batch_nbytes=0, timeout_s=0.1) is TxEvent.IDLE
            assert loop.pending  # a frame is half written: write nothing else now
            threading.Timer(0.05, loop.interrupt).start()
            assert loop.run(batch_nbytes=0, timeout_s=10) is TxEvent.INTERRUPTED
            stream, _ = push_all(loop, b)
            stats = loop.stats
        check_stream(layout, stream, set(range(npages)), set(), 64)
        assert stats.wire_bytes == len(stream)
        assert stats.normal_pages == npages and stats.payload_bytes == npages * PAGE
        a.close()
        b.close()


def test_interrupt_and_jump_racing_close_are_harmless() -> None:
    """The owner's stop() may interrupt the loop while its thread closes it (the push
    just ended): the interrupt must neither touch the freed loop nor fail (it did:
    EBADF on the closed eventfd, which turned a cancellation into a 'failure')."""
    with source_ram([16], set()) as (mems, layout):
        for _ in range(200):
            a, b = socket.socketpair()
            loop = PushLoop(a.fileno(), pagemap(mems, layout, PageBitmap(16)), max_frame_pages=8)
            go = threading.Barrier(2)

            def poke(loop: PushLoop, go: threading.Barrier) -> None:
                go.wait()
                for _ in range(50):
                    loop.interrupt()
                    loop.jump(3)

            t = threading.Thread(target=poke, args=(loop, go))
            t.start()
            go.wait()
            loop.close()
            t.join()
            loop.interrupt()  # closed: nothing to interrupt, no error
            loop.jump(5)
            a.close()
            b.close()
