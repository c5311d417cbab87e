"""Frames carrying pages, whatever channel they came on, into the PageStore.

Before ``VmState`` precopy payloads land in guest RAM itself (the sink hands the
socket the guest pages); afterwards every payload lands in a staging buffer and is
installed by the kernel, only where still missing.  The background push on a
connection the loop reads (MAIN, or BULK over TLS) goes through the installer thread
so a fault never waits behind a whole frame's install; urgent answers are installed
at once.  Each channel has its own staging buffer: a payload may arrive in pieces
while another channel's frame completes in between.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from migrated.kernel import PageBitmap
from migrated.protocol import (
    Discard,
    DiscardBitmap,
    Pages,
    PrecopyRoundAck,
    PrecopyRoundEnd,
    ZeroPages,
)
from migrated.protocol.state import MigrationState
from migrated.transport.channel import Channel

from ..ram import PAGE_SIZE, staging_buffer
from . import guest
from .installer import Installer
from .pages import Runs

if TYPE_CHECKING:
    from .engine import DestinationEngine

__all__ = [
    "after_install",
    "on_discard",
    "on_discard_bitmap",
    "on_pages",
    "on_round_end",
    "on_zero_pages",
    "sink",
]

S = MigrationState


def sink(eng: DestinationEngine, ch: Channel, header: Any) -> memoryview | None:
    store = eng.store
    if type(header) is not Pages or store is None:
        return None
    page = store.ram.page_of_gpa(header.gpa)
    if not store.sealed:
        return store.precopy_target(page, header.npages)
    nbytes = header.npages * PAGE_SIZE
    if ch.name in ("main", "bulk"):  # the push on a connection the loop reads
        installer = get_installer(eng)
        buf = installer.take_buffer()
        if buf is not None:
            if installer.buffers_free == 0 and installer.nbuffers > 1:
                # The last buffer: read this frame into it, then nothing more until
                # an earlier one comes back (with one buffer there is no earlier one:
                # never hold, the next frame is installed on the loop instead).
                ch.hold_reading("staging")
                eng.staging_held.add(ch)
            eng.ring[ch] = buf
            return buf[:nbytes]
    # Each channel has its own staging buffer: a payload may arrive in pieces while
    # another channel's frame completes in between.
    staging = eng.staging.get(ch)
    if staging is None:
        staging = eng.staging[ch] = staging_buffer(eng.opts.max_frame_nbytes)
    return staging[:nbytes]


def get_installer(eng: DestinationEngine) -> Installer:
    if eng.installer is None:
        assert eng.store is not None
        eng.installer = Installer(
            eng.store,
            partial(after_install, eng),
            partial(buffer_free, eng),
            nbuffers=eng.opts.install_buffers,
            buffer_nbytes=eng.opts.max_frame_nbytes,
        )
        eng.installer.start()
    return eng.installer


def buffer_free(eng: DestinationEngine) -> None:
    """A staging buffer came back: every channel that stopped reading for want of
    one reads again.  (Those are remembered apart from ``eng.ring``, which forgets a
    channel as soon as its frame is complete: the BULK channel that took the last
    buffer was never released, and BULK over TLS stopped for good.)"""
    held, eng.staging_held = eng.staging_held, set()
    for ch in held:
        ch.release_reading("staging")


def on_pages(eng: DestinationEngine, ch: Channel, p: Pages) -> None:
    store = eng.store
    assert store is not None and p.data is not None
    page = store.ram.page_of_gpa(p.gpa)
    account(eng, p.npages * PAGE_SIZE, p.npages, zero=False)
    if not store.sealed:
        store.precopy_pages(page, p.npages)
        return
    buf = eng.ring.pop(ch, None)
    if buf is not None:
        get_installer(eng).submit(page, p.npages, p.data, buf)
    else:
        after_install(eng, store.install(page, p.npages, p.data))


def on_zero_pages(eng: DestinationEngine, ch: Channel, z: ZeroPages) -> None:
    store = eng.store
    assert store is not None
    page = store.ram.page_of_gpa(z.gpa)
    account(eng, 0, z.npages, zero=True)
    if not store.sealed:
        store.precopy_zero(page, z.npages)
    else:
        after_install(eng, store.install(page, z.npages, None))


def account(eng: DestinationEngine, nbytes: int, npages: int, *, zero: bool) -> None:
    st = eng.stats
    if zero:
        st.zero_pages += npages
    else:
        st.normal_pages += npages
    if eng.state is S.ACTIVE:
        st.precopy_bytes += nbytes
    elif eng.guest_started:
        st.postcopy_bytes += nbytes
    else:
        st.downtime_bytes += nbytes


def after_install(eng: DestinationEngine, runs: Runs) -> None:
    """On the loop, after pages were newly installed (any path)."""
    if eng.faults is not None:
        eng.faults.installed(runs)
    if eng.prefaulter is not None and eng.store is not None:
        for page, n in runs:
            eng.prefaulter.submit(eng.store.ram.gpa_of_page(page), n * PAGE_SIZE)
    guest.maybe_complete(eng)


def on_discard(eng: DestinationEngine, ch: Channel, d: Discard) -> None:
    assert eng.store is not None
    eng.stats.discarded_pages += eng.store.discard(eng.store.ram.page_of_gpa(d.gpa), d.npages)


def on_discard_bitmap(eng: DestinationEngine, ch: Channel, d: DiscardBitmap) -> None:
    assert eng.store is not None and d.data is not None
    stale = PageBitmap.from_bytes(eng.store.total_pages, d.data)
    eng.stats.discarded_pages += eng.store.discard_marked(stale)


def on_round_end(eng: DestinationEngine, ch: Channel, r: PrecopyRoundEnd) -> None:
    assert eng.session is not None
    eng.stats.precopy_rounds = r.round
    eng.stats.dirty_pages_per_round.append(r.dirty_pages)
    ch.send(PrecopyRoundAck(r.round, eng.session.payload_bytes))
    eng.emit({"event": "precopy-round", "round": r.round, "dirty_pages": r.dirty_pages})
