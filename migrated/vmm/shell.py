"""VmShell: the KVM objects of a VM whose state has not arrived yet.

A migration destination knows the RAM layout and the vCPU count at ``Setup``, long
before the VM state comes with the switchover.  Opening /dev/kvm, creating the VM, its
RAM slot and its vCPUs takes 2 to 4 ms here (more with more RAM: the slot), all of it
downtime if done when the state arrives.  A shell does it ahead;
:meth:`Machine.restore` then adopts it and only loads state.

Facts we rely on: creating a VM, a memslot over not-yet-populated (even
userfaultfd-registered-later) memory and vCPUs touches no guest memory; a vCPU's state
is loaded by its own thread before its first KVM_RUN (see ``machine``), so an adopted
vCPU is as good as a fresh one.
"""

from __future__ import annotations

from migrated.kernel import GuestMemory, Kvm, Vcpu, Vm

__all__ = ["VmShell"]


class VmShell:
    """/dev/kvm, a VM with ``memory`` in slot 0 at GPA 0, and ``vcpus`` vCPUs, none run.

    Every :class:`Machine` is built on one: made by the machine itself, or ahead by a
    destination.  Owned by whoever built it until a machine adopts it (:meth:`take`);
    ``close()`` releases what it still owns and is idempotent.  ``kvm`` given: used,
    never closed here; else /dev/kvm is opened and owned.  Never closes ``memory``."""

    def __init__(self, memory: GuestMemory, vcpus: int, *, kvm: Kvm | None = None) -> None:
        self.memory = memory
        self.vcpu_count = vcpus
        self._owns_kvm = kvm is None
        self._kvm: Kvm | None = kvm if kvm is not None else Kvm.open()
        self._vm: Vm | None = None
        self._vcpus: list[Vcpu] = []
        try:
            self._vm = self._kvm.create_vm()
            self._vm.set_memory_region(slot=0, gpa=0, memory=memory)
            for i in range(vcpus):
                self._vcpus.append(self._vm.create_vcpu(i))
        except BaseException:
            self.close()
            raise

    def fits(self, memory: GuestMemory, vcpus: int) -> bool:
        return self._vm is not None and memory is self.memory and vcpus == self.vcpu_count

    def take(self) -> tuple[Kvm, Vm, list[Vcpu], bool]:
        """Hand the KVM objects over, and whether /dev/kvm is the taker's to close:
        from now on the caller closes them."""
        kvm, vm, vcpus, owns_kvm = self._kvm, self._vm, self._vcpus, self._owns_kvm
        if kvm is None or vm is None:
            raise ValueError("VM shell already taken or closed")
        self._kvm, self._vm, self._vcpus, self._owns_kvm = None, None, [], False
        return kvm, vm, vcpus, owns_kvm

    def close(self) -> None:
        for v in self._vcpus:
            v.close()
        self._vcpus = []
        if self._vm is not None:
            self._vm.close()
            self._vm = None
        if self._kvm is not None and self._owns_kvm:
            self._kvm.close()
        self._kvm = None
