"""A minimal real-mode VM for kernel-layer tests: a few bytes of code at 0x1000.

Real mode is emulated on this host (slow), which does not matter for a handful of
instructions, and needs no page tables: the kernel layer is tested on its own,
independent of the VMM's boot code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from migrated.kernel import GuestMemory, Kvm, Regs, Vcpu, Vm

CODE_GPA = 0x1000


@dataclass
class RealModeVm:
    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    vcpu: Vcpu

    def boot(self) -> None:
        sregs = self.vcpu.get_sregs()
        cs = dataclasses.replace(sregs.cs, base=0, selector=0)
        self.vcpu.set_sregs(dataclasses.replace(sregs, cs=cs))
        self.vcpu.set_regs(Regs(rip=CODE_GPA, rflags=0x2))


@contextmanager
def realmode_vm(
    code: bytes, nbytes: int = 1 << 20, *, log_dirty: bool = False, write_code: bool = True
) -> Iterator[RealModeVm]:
    with Kvm.open() as kvm, kvm.create_vm() as vm, GuestMemory.create(nbytes) as mem:
        if write_code:
            mem.view[CODE_GPA : CODE_GPA + len(code)] = code
        vm.set_memory_region(0, 0, mem, log_dirty=log_dirty)
        vcpu = vm.create_vcpu(0)
        try:
            rm = RealModeVm(kvm, vm, mem, vcpu)
            rm.boot()
            yield rm
        finally:
            vcpu.close()
