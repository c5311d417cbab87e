"""The guest's dirty page log and a spare vCPU: what a migration needs from KVM.

The engines never touch the KVM objects inside a :class:`~migrated.vmm.machine.Machine`;
they get these two views instead:

* :class:`DirtyLog`: KVM_GET_DIRTY_LOG on every RAM slot, as one bitmap of global page
  indexes (regions in guest-physical order, as the wire layout numbers them).  Enabling
  and disabling logging rewrites the memslot flags (KVM_SET_USER_MEMORY_REGION), which
  costs milliseconds: do it outside the downtime.  Fetching also clears the log (no
  manual protection is enabled), so each fetch returns what was written since the
  previous one.
* :class:`SpareVcpu`: a vCPU that never runs, for vCPU ioctls that must not wait for a
  running vCPU's mutex (KVM_PRE_FAULT_MEMORY, see engine.destination.prefault).  Its
  ioctls may be issued from any one thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from migrated.kernel import Cap, PageBitmap, PreFaultResult, Vcpu

if TYPE_CHECKING:
    from .machine import Machine

__all__ = ["DirtyLog", "SpareVcpu"]

PAGE_SIZE = 4096


class DirtyLog:
    """Dirty logging of all of a machine's RAM.  Not thread-safe: one owner."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self.total_pages = sum(r.nbytes // PAGE_SIZE for r in machine.regions)
        self.enabled = False

    def _set(self, on: bool) -> None:
        vm = self._machine.vm
        for r in self._machine.regions:
            vm.set_memory_region(r.slot, r.gpa, r.memory, log_dirty=on)
        self.enabled = on

    def enable(self) -> None:
        """Start logging, from a clean log.  Raises OSError when KVM refuses."""
        self._set(True)
        self.fetch()

    def disable(self) -> None:
        """Stop logging (idempotent).  Raises OSError when KVM refuses."""
        if self.enabled:
            self._set(False)

    def fetch(self) -> PageBitmap:
        """The pages written since the last fetch (and clear the log), as a bitmap of
        global page indexes.  Raises OSError."""
        vm = self._machine.vm
        dirty = PageBitmap(self.total_pages)
        first = 0
        for r in sorted(self._machine.regions, key=lambda reg: reg.gpa):
            npages = r.nbytes // PAGE_SIZE
            log = vm.get_dirty_log(r.slot)
            if first % 8 == 0:
                # Byte-aligned (always, with 4 KiB pages and 2 MiB-aligned regions): one
                # copy.  Per-run Python cost 10 ms of downtime for ~2000 scattered pages.
                nbytes = (npages + 7) // 8
                dirty.data[first // 8 : first // 8 + nbytes] = log[:nbytes]
                if npages % 8:
                    dirty.data[first // 8 + nbytes - 1] &= (1 << (npages % 8)) - 1
            else:
                region = PageBitmap.from_bytes(npages, log)
                for p, n in region.runs(True):
                    dirty.set(first + p, n)
            first += npages
        return dirty


class SpareVcpu:
    """A vCPU of the machine's VM that never runs.  ``close()`` is idempotent."""

    def __init__(self, machine: Machine) -> None:
        vm = machine.vm
        self.pre_fault_capability = bool(vm.check_extension(Cap.PRE_FAULT_MEMORY))
        self._vcpu: Vcpu | None = vm.create_vcpu(machine.config.vcpus)

    def pre_fault(self, gpa: int, nbytes: int) -> PreFaultResult:
        """KVM_PRE_FAULT_MEMORY over installed guest pages.  Raises OSError, or
        ValueError once closed."""
        if self._vcpu is None:
            raise ValueError("the spare vCPU is closed")
        return self._vcpu.pre_fault_memory(gpa, nbytes)

    def close(self) -> None:
        vcpu, self._vcpu = self._vcpu, None
        if vcpu is not None:
            vcpu.close()
