"""Thread names as the kernel shows them (comm), for top -H and per-thread accounting."""

from __future__ import annotations

import threading
from pathlib import Path

from migrated.kernel import set_thread_name


def comm(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().strip()


def test_a_thread_names_itself_for_the_kernel() -> None:
    seen: dict[str, str] = {}

    def body(name: str) -> None:
        set_thread_name(name)
        seen[name] = comm(threading.get_native_id())

    for name in ("migrated-push", "vcpu3/a-very-long-vm-name"):
        t = threading.Thread(target=body, args=(name,))
        t.start()
        t.join()
    assert seen == {
        "migrated-push": "migrated-push",
        "vcpu3/a-very-long-vm-name": "vcpu3/a-very-lo",  # the kernel keeps 15 bytes
    }
    assert comm(threading.get_native_id()) != "migrated-push"  # only the caller renamed
