"""KVM_PRE_FAULT_MEMORY for guest ranges the destination has installed.

Facts we rely on:

* KVM_PRE_FAULT_MEMORY is a vCPU ioctl, and vCPU ioctls wait for the vCPU's mutex,
  which KVM_RUN holds.  Issued on a running vCPU it would stall until that vCPU
  exits.  We therefore create one *spare* vCPU that never runs: its mutex is always
  free, and the stage-2 (TDP) page tables it fills are shared by the whole VM.
* It only makes sense for installed pages: on a missing page the kernel's own access
  would raise a userfaultfd fault and block the calling thread.  Callers submit
  ranges right after UFFDIO_COPY/ZEROPAGE.
* With shadow paging (this project's CI hosts) the capability is absent and the call
  fails with EOPNOTSUPP.  We still probe with one real call, switch the feature off,
  and say so in the statistics.
* Calls run on one worker thread (the GIL is released inside the ioctl), never on
  the event loop, so a slow pre-fault cannot delay fault service.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import Any

from migrated.kernel import Cap, Vcpu

__all__ = ["PreFaulter"]

_BATCH_NBYTES = 64 << 20


class PreFaulter:
    def __init__(self, machine: Any, emit: Callable[[dict[str, Any]], None]) -> None:
        self._emit = emit
        self.capability = bool(machine.vm.check_extension(Cap.PRE_FAULT_MEMORY))
        self.enabled = True
        self.reason = ""
        self.calls = 0
        self.nbytes = 0
        self._queue: collections.deque[tuple[int, int]] = collections.deque()
        self._lock = threading.Lock()
        self._worker_busy = False
        self._vcpu: Vcpu | None = machine.vm.create_vcpu(machine.config.vcpus)

    def probe(self, gpa: int | None) -> None:
        """One real call on an installed page (``gpa``), before the guest starts."""
        if gpa is None or self._vcpu is None:
            return
        result = self._vcpu.pre_fault_memory(gpa, 4096)
        self.calls += result.calls
        if not result.supported:
            self._disable(
                "KVM_PRE_FAULT_MEMORY unsupported here (EOPNOTSUPP: shadow paging, "
                f"capability {'present' if self.capability else 'absent'})"
            )
        else:
            self.nbytes += result.nbytes_done

    def _disable(self, reason: str) -> None:
        self.enabled = False
        self.reason = reason
        self._emit({"event": "prefault-disabled", "reason": reason})

    def submit(self, gpa: int, nbytes: int) -> None:
        """Queue an installed range; coalesces with the previous one when adjacent."""
        if not self.enabled:
            return
        with self._lock:
            if (
                self._queue
                and self._queue[-1][0] + self._queue[-1][1] == gpa
                and self._queue[-1][1] < _BATCH_NBYTES
            ):
                g, n = self._queue.pop()
                self._queue.append((g, n + nbytes))
            else:
                self._queue.append((gpa, nbytes))
            if self._worker_busy:
                return
            self._worker_busy = True
        asyncio.get_running_loop().run_in_executor(None, self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue or not self.enabled or self._vcpu is None:
                    self._worker_busy = False
                    return
                gpa, nbytes = self._queue.popleft()
            try:
                result = self._vcpu.pre_fault_memory(gpa, nbytes)
            except OSError as exc:
                self.enabled = False
                self.reason = f"KVM_PRE_FAULT_MEMORY failed: {exc}"
                continue
            self.calls += result.calls
            if not result.supported:
                self.enabled = False
                self.reason = "KVM_PRE_FAULT_MEMORY unsupported (EOPNOTSUPP)"
            self.nbytes += result.nbytes_done

    def report(self) -> dict[str, Any]:
        return {
            "capability": self.capability,
            "enabled": self.enabled,
            "reason": self.reason,
            "calls": self.calls,
            "bytes": self.nbytes,
        }

    def close(self) -> None:
        with self._lock:
            self.enabled = False
            vcpu, self._vcpu = self._vcpu, None
        if vcpu is not None:
            vcpu.close()
