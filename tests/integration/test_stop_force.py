"""``stop --force`` on the source in the middle of postcopy, twenty times in a row.

The source's BULK push thread reads guest memory until the very end; the first engine
unmapped that memory under it (SIGSEGV in ``mig_page_is_zero``, 3 tries in 4).  Now the
VM process joins every thread that reads guest memory before it unmaps it, so the forced
stop always ends the same way: the process exits 0 ("stopped by the operator"), the
``send`` client exits 4 (the source VM process went away), and the destination keeps its
copy of the VM paused on the pages it lacks (``postcopy-paused``), never killed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .faults import GUEST, start_send, wait_bytes, wait_status
from .pair import Pair, tail

pytestmark = [pytest.mark.kvm, pytest.mark.uffd, pytest.mark.slow]

TRIES = 20


def test_stop_force_on_source_in_postcopy_never_crashes(workdir: Path) -> None:
    outcomes: list[tuple[int, int]] = []
    for i in range(TRIES):
        pair = Pair(workdir / f"try{i:02d}")
        pair.workdir.mkdir()
        try:
            pair.start(GUEST)
            send = start_send(pair, "postcopy", "--postcopy-bandwidth", "16",
                              "--recovery-timeout", "60")  # fmt: skip
            wait_status(pair, pair.src_sock, "postcopy-active", procs=[send.proc])
            wait_bytes(pair, send, 4 << 20)  # the BULK push is reading guest memory
            r = pair.cli("stop", "--force", "--control", pair.src_sock, timeout=60)
            assert pair.source is not None and pair.dest is not None
            code = pair.source.wait(30)
            assert code == 0, (
                f"try {i}: the source exited {code} after `stop --force` (stop said "
                f"{r.returncode}: {r.stderr.strip()})\n{tail(pair.source.log)}"
            )
            sent = send.result(30)
            assert sent.returncode == 4, f"try {i}: send exited {sent.returncode}"
            wait_status(pair, pair.dst_sock, "postcopy-paused", timeout=20)
            assert pair.dest.alive(), f"try {i}: the destination died\n{tail(pair.dest.log)}"
            outcomes.append((code, sent.returncode))
            # Split and paused, it ignores SIGTERM on purpose (close() would wait 5 s for
            # that): seen what it had to show, it goes at once.
            pair.dest.kill9()
        finally:
            pair.close()
    assert outcomes == [(0, 4)] * TRIES
