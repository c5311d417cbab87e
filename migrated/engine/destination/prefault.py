"""KVM_PRE_FAULT_MEMORY for guest ranges the destination has installed.

Facts we rely on:

* KVM_PRE_FAULT_MEMORY is a vCPU ioctl, and vCPU ioctls wait for the vCPU's mutex,
  which KVM_RUN holds: issued on a running vCPU it would stall until that vCPU exits.
  So it runs on a *spare* vCPU that never runs (``Machine.spare_vcpu()``); the
  stage-2 (TDP) tables it fills are shared by the whole VM.
* It only makes sense for installed pages: on a missing page the kernel's own access
  would raise a userfaultfd fault and block the calling thread.  Ranges are submitted
  right after they were installed.
* With shadow paging (this project's CI hosts) the capability is absent and the call
  fails with EOPNOTSUPP.  One real call probes it; the feature then switches itself off
  and the statistics say so.
* Calls run on one owned worker thread (the GIL is released inside the ioctl), never on
  the event loop, so a slow pre-fault cannot delay fault service.  The owner joins it
  before closing the spare vCPU and the machine.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

from migrated.vmm import Machine, SpareVcpu

from ..ram import PAGE_SIZE
from ..threads import Worker

__all__ = ["PreFaulter"]

log = logging.getLogger(__name__)

_BATCH_NBYTES = 64 << 20


class PreFaulter:
    def __init__(self, machine: Machine) -> None:
        self._vcpu: SpareVcpu = machine.spare_vcpu()
        self.capability = self._vcpu.pre_fault_capability
        self.enabled = True
        self.reason = ""
        self.calls = 0
        self.nbytes = 0
        self._queue: collections.deque[tuple[int, int]] = collections.deque()
        self._wake = threading.Condition()
        self.worker = Worker("migrated-prefault", self._work, on_stop=self._notify)

    def start(self, probe_gpa: int | None) -> None:
        """Probe with one call on an installed page, then serve submissions."""
        if probe_gpa is not None:
            self.submit(probe_gpa, PAGE_SIZE)
        self.worker.start()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def submit(self, gpa: int, nbytes: int) -> None:
        """Queue an installed range; coalesced with the previous one when adjacent."""
        if not self.enabled:
            return
        with self._wake:
            if self._queue and sum(self._queue[-1]) == gpa and self._queue[-1][1] < _BATCH_NBYTES:
                g, n = self._queue.pop()
                self._queue.append((g, n + nbytes))
            else:
                self._queue.append((gpa, nbytes))
            self._wake.notify()

    def _work(self, worker: Worker) -> None:
        while not worker.stopping:
            with self._wake:
                while not self._queue and not worker.stopping:
                    self._wake.wait()
                if worker.stopping:
                    return
                gpa, nbytes = self._queue.popleft()
            try:
                result = self._vcpu.pre_fault(gpa, nbytes)
            except OSError as exc:
                self._disable(f"KVM_PRE_FAULT_MEMORY failed: {exc}")
                return
            self.calls += result.calls
            self.nbytes += result.nbytes_done
            if not result.supported:
                self._disable(
                    "KVM_PRE_FAULT_MEMORY unsupported here (EOPNOTSUPP: shadow paging, "
                    f"capability {'present' if self.capability else 'absent'})"
                )
                return

    def _disable(self, reason: str) -> None:
        self.enabled = False
        self.reason = reason
        log.info("%s", reason)

    def report(self) -> dict[str, Any]:
        return {
            "capability": self.capability,
            "enabled": self.enabled,
            "reason": self.reason,
            "calls": self.calls,
            "bytes": self.nbytes,
        }

    async def close(self) -> None:
        """Stop and join the worker, then close the spare vCPU."""
        self.worker.stop()
        await self.worker.join()
        self._vcpu.close()
