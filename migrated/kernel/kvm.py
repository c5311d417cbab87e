"""Typed handles for /dev/kvm, a VM and its vCPUs.

Facts we rely on:

* VM and vCPU ioctls only work from the process that created the VM.
* vCPU ioctls take the vCPU's mutex, which KVM_RUN holds: any ioctl on a vCPU that is
  inside KVM_RUN waits until that vCPU exits.  State get/set and KVM_PRE_FAULT_MEMORY
  must therefore be issued by the vCPU's own thread or while it is parked.
* KVM_RUN returns EINTR when a signal is delivered to the thread inside it.  Setting
  ``kvm_run.immediate_exit`` before the signal closes the race with a signal that
  arrives just before KVM_RUN is entered: KVM_RUN then returns EINTR at once, after
  completing any I/O instruction whose data userspace supplied (KVM's documented way
  to make state consistent before saving it).
* cffi releases the GIL around every C call, so a vCPU thread inside KVM_RUN does not
  stop other Python threads.
* KVM_GET_DIRTY_LOG clears the log as it reads it unless manual protection
  (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) was enabled on the VM; then KVM_CLEAR_DIRTY_LOG
  re-protects pages explicitly.
* KVM_PRE_FAULT_MEMORY (capability 236) maps guest pages into the stage-2 tables.  It
  is unsupported with shadow paging (EOPNOTSUPP); it may return EINTR/EAGAIN, or
  succeed with a partial range, with ``gpa``/``size`` updated: the caller repeats.
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass
from typing import Any

from ._util import check, ffi, ioctl, lib, raise_errno
from .memory import GuestMemory
from .regs import STRUCT_PARTS, Regs, Sregs, VcpuState

__all__ = ["Cap", "ExitReason", "Kvm", "PreFaultResult", "Vcpu", "VcpuExit", "Vm"]


class Cap(enum.IntEnum):
    """The KVM capabilities migrated probes."""

    USER_MEMORY = lib.KVM_CAP_USER_MEMORY
    NR_VCPUS = lib.KVM_CAP_NR_VCPUS
    MAX_VCPUS = lib.KVM_CAP_MAX_VCPUS
    NR_MEMSLOTS = lib.KVM_CAP_NR_MEMSLOTS
    IMMEDIATE_EXIT = lib.KVM_CAP_IMMEDIATE_EXIT
    MANUAL_DIRTY_LOG_PROTECT2 = lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    XSAVE = lib.KVM_CAP_XSAVE
    XSAVE2 = lib.KVM_CAP_XSAVE2
    XCRS = lib.KVM_CAP_XCRS
    VCPU_EVENTS = lib.KVM_CAP_VCPU_EVENTS
    DEBUGREGS = lib.KVM_CAP_DEBUGREGS
    PRE_FAULT_MEMORY = lib.KVM_CAP_PRE_FAULT_MEMORY


class ExitReason(enum.IntEnum):
    UNKNOWN = lib.KVM_EXIT_UNKNOWN
    EXCEPTION = lib.KVM_EXIT_EXCEPTION
    IO = lib.KVM_EXIT_IO
    HYPERCALL = lib.KVM_EXIT_HYPERCALL
    DEBUG = lib.KVM_EXIT_DEBUG
    HLT = lib.KVM_EXIT_HLT
    MMIO = lib.KVM_EXIT_MMIO
    SHUTDOWN = lib.KVM_EXIT_SHUTDOWN
    FAIL_ENTRY = lib.KVM_EXIT_FAIL_ENTRY
    INTR = lib.KVM_EXIT_INTR
    INTERNAL_ERROR = lib.KVM_EXIT_INTERNAL_ERROR
    SYSTEM_EVENT = lib.KVM_EXIT_SYSTEM_EVENT
    OTHER = -1


@dataclass(frozen=True, slots=True)
class VcpuExit:
    """Why KVM_RUN returned.  For ``IO`` exits the port fields are set; ``data`` holds
    the bytes an OUT wrote.  ``detail`` carries the hardware/internal error code."""

    reason: ExitReason
    raw_reason: int
    io_in: bool = False
    port: int = 0
    size: int = 0
    count: int = 0
    data: bytes = b""
    detail: int = 0


@dataclass(frozen=True, slots=True)
class PreFaultResult:
    """Outcome of :meth:`Vcpu.pre_fault_memory`.

    ``supported`` is False when the host answered EOPNOTSUPP (shadow paging) or lacks
    the ioctl (ENOTTY); ``nbytes_done`` counts bytes KVM reported as mapped.
    """

    supported: bool
    nbytes_done: int
    calls: int


class Kvm:
    """An open /dev/kvm.  ``close()`` is idempotent."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._msr_indices: tuple[int, ...] | None = None

    @classmethod
    def open(cls, path: str = "/dev/kvm") -> Kvm:
        """Raises OSError (ENOENT/EACCES) when KVM is not usable, naming the path."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open {path}: {exc.strerror}") from exc
        kvm = cls(fd)
        version = ioctl(fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != lib.KVM_API_VERSION:
            kvm.close()
            raise OSError(
                errno.EINVAL, f"{path} speaks KVM API {version}, need {lib.KVM_API_VERSION}"
            )
        return kvm

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("KVM handle is closed")
        return self._fd

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fileno(), lib.KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    @property
    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fileno(), lib.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def msr_indices(self) -> tuple[int, ...]:
        """The MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST)."""
        if self._msr_indices is None:
            buf = ffi.new("uint32_t[]", 4096)
            n = check(
                lib.mig_get_msr_index_list(self.fileno(), buf, 4096), "KVM_GET_MSR_INDEX_LIST"
            )
            self._msr_indices = tuple(int(buf[i]) for i in range(n))
        return self._msr_indices

    def create_vm(self) -> Vm:
        fd = ioctl(self.fileno(), lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vm:
    """A KVM VM.  Memory slots, dirty log, vCPUs.  ``close()`` is idempotent."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self._fd = fd
        self._slots: dict[int, tuple[int, int, int]] = {}  # slot -> (gpa, nbytes, flags)
        self.manual_dirty_protect = False

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("VM handle is closed")
        return self._fd

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fileno(), lib.KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION(vm)")

    def enable_manual_dirty_protect(self) -> bool:
        """Enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (before any slot logs dirty pages).
        Returns False when the host does not offer it."""
        offered = self.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2)
        if not offered & lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            return False
        cap = ffi.new("struct kvm_enable_cap *")
        cap.cap = Cap.MANUAL_DIRTY_LOG_PROTECT2
        cap.args[0] = lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        ioctl(self.fileno(), lib.KVM_ENABLE_CAP, cap, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)")
        self.manual_dirty_protect = True
        return True

    def set_memory_region(
        self,
        slot: int,
        gpa: int,
        memory: GuestMemory,
        *,
        log_dirty: bool = False,
        offset: int = 0,
        nbytes: int | None = None,
    ) -> None:
        """Map ``memory[offset:offset+nbytes]`` at ``gpa`` in ``slot``; calling again
        with the same slot changes its flags (e.g. turns dirty logging on or off)."""
        nbytes = memory.nbytes - offset if nbytes is None else nbytes
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        region.guest_phys_addr = gpa
        region.memory_size = nbytes
        region.userspace_addr = memory.address + offset
        ioctl(
            self.fileno(),
            lib.KVM_SET_USER_MEMORY_REGION,
            region,
            f"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {gpa:#x}, {nbytes:#x} bytes)",
        )
        self._slots[slot] = (gpa, nbytes, int(region.flags))

    def dirty_bitmap_nbytes(self, slot: int) -> int:
        _, nbytes, _ = self._slots[slot]
        npages = nbytes // 4096
        return ((npages + 63) // 64) * 8  # KVM writes whole 64-bit words

    def get_dirty_log(self, slot: int, into: bytearray | None = None) -> bytearray:
        """The slot's dirty bitmap (bit i = 4 KiB page i of the slot, LSB first).

        Without manual protection this also clears the log; with it, call
        :meth:`clear_dirty_log` for the pages you are about to copy.
        """
        size = self.dirty_bitmap_nbytes(slot)
        buf = into if into is not None else bytearray(size)
        if len(buf) < size:
            raise ValueError(f"dirty bitmap buffer of {len(buf)} bytes, need {size}")
        check(
            lib.mig_get_dirty_log(self.fileno(), slot, ffi.from_buffer(buf)),
            f"KVM_GET_DIRTY_LOG(slot {slot})",
        )
        return buf

    def clear_dirty_log(
        self, slot: int, bitmap: bytearray, first_page: int = 0, num_pages: int | None = None
    ) -> None:
        """KVM_CLEAR_DIRTY_LOG: re-protect the pages set in ``bitmap`` (manual mode).
        ``first_page`` must be a multiple of 64."""
        _, nbytes, _ = self._slots[slot]
        num_pages = nbytes // 4096 - first_page if num_pages is None else num_pages
        check(
            lib.mig_clear_dirty_log(
                self.fileno(), slot, first_page, num_pages, ffi.from_buffer(bitmap)
            ),
            f"KVM_CLEAR_DIRTY_LOG(slot {slot})",
        )

    def create_vcpu(self, index: int) -> Vcpu:
        fd = ioctl(self.fileno(), lib.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU({index})")
        try:
            return Vcpu(self, index, fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# (part name, capability needed or None, struct name, get ioctl, set ioctl)
_PART_IOCTLS: dict[str, tuple[Cap | None, str, int, int]] = {
    "regs": (None, "struct kvm_regs", lib.KVM_GET_REGS, lib.KVM_SET_REGS),
    "sregs": (None, "struct kvm_sregs", lib.KVM_GET_SREGS, lib.KVM_SET_SREGS),
    "fpu": (None, "struct kvm_fpu", lib.KVM_GET_FPU, lib.KVM_SET_FPU),
    "xsave": (Cap.XSAVE, "struct kvm_xsave", lib.KVM_GET_XSAVE, lib.KVM_SET_XSAVE),
    "xcrs": (Cap.XCRS, "struct kvm_xcrs", lib.KVM_GET_XCRS, lib.KVM_SET_XCRS),
    "vcpu_events": (
        Cap.VCPU_EVENTS,
        "struct kvm_vcpu_events",
        lib.KVM_GET_VCPU_EVENTS,
        lib.KVM_SET_VCPU_EVENTS,
    ),
    "mp_state": (None, "struct kvm_mp_state", lib.KVM_GET_MP_STATE, lib.KVM_SET_MP_STATE),
    "debugregs": (
        Cap.DEBUGREGS,
        "struct kvm_debugregs",
        lib.KVM_GET_DEBUGREGS,
        lib.KVM_SET_DEBUGREGS,
    ),
}


class Vcpu:
    """One vCPU: its fd and its mmap'd ``kvm_run`` page.

    Every method except setting :attr:`immediate_exit` must be called from the thread
    that runs the vCPU, or while that thread is parked outside KVM_RUN.
    """

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self._fd = fd
        size = vm.kvm.vcpu_mmap_size
        ptr = lib.mmap(ffi.NULL, size, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED, fd, 0)
        if ptr == ffi.cast("void *", -1):
            raise_errno(ffi.errno, f"mmap kvm_run of vCPU {index}")
        self._run_size = size
        self._run_ptr = ptr
        self._run: Any = ffi.cast("struct kvm_run *", ptr)
        self._io = ffi.new("struct mig_io_exit *")
        check(lib.mig_set_supported_cpuid(vm.kvm.fileno(), fd), f"KVM_SET_CPUID2(vCPU {index})")
        self._parts = self._probe_parts()

    def _probe_parts(self) -> tuple[str, ...]:
        kvm = self.vm.kvm
        have = []
        for name in STRUCT_PARTS:
            cap = _PART_IOCTLS[name][0]
            if cap is None or kvm.check_extension(cap):
                have.append(name)
        if "xsave" in have and "fpu" in have:
            have.remove("fpu")  # xsave is a superset of the legacy FPU state
        return tuple(have)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError(f"vCPU {self.index} is closed")
        return self._fd

    # -- running -------------------------------------------------------------------

    @property
    def immediate_exit(self) -> bool:
        return bool(self._run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._run.immediate_exit = 1 if value else 0

    def run(self) -> VcpuExit:
        """KVM_RUN once, with the GIL released.

        Raises InterruptedError when a signal (or ``immediate_exit``) interrupted it;
        any other failure is an OSError.
        """
        rc = lib.ioctl(
            self.fileno(), ffi.cast("unsigned long", lib.KVM_RUN), ffi.cast("unsigned long", 0)
        )
        if rc < 0:
            err = ffi.errno
            if err == errno.EINTR:
                raise InterruptedError(errno.EINTR, f"KVM_RUN of vCPU {self.index} interrupted")
            raise_errno(err, f"KVM_RUN of vCPU {self.index}")
        raw = int(self._run.exit_reason)
        try:
            reason = ExitReason(raw)
        except ValueError:
            reason = ExitReason.OTHER
        if reason is ExitReason.IO:
            io = self._io
            lib.mig_run_io(self._run, io)
            io_in = io.direction == lib.KVM_EXIT_IO_IN
            data = b""
            if not io_in:
                n = int(io.size) * int(io.count)
                data = bytes(ffi.buffer(ffi.cast("char *", self._run_ptr) + io.data_offset, n))
            return VcpuExit(
                reason,
                raw,
                io_in=io_in,
                port=int(io.port),
                size=int(io.size),
                count=int(io.count),
                data=data,
            )
        if reason is ExitReason.FAIL_ENTRY:
            return VcpuExit(reason, raw, detail=int(lib.mig_run_fail_entry_reason(self._run)))
        if reason is ExitReason.INTERNAL_ERROR:
            return VcpuExit(reason, raw, detail=int(lib.mig_run_internal_suberror(self._run)))
        if reason is ExitReason.SYSTEM_EVENT:
            return VcpuExit(reason, raw, detail=int(lib.mig_run_system_event_type(self._run)))
        return VcpuExit(reason, raw)

    def set_io_in_data(self, data: bytes) -> None:
        """Answer the IN that caused the last IO exit (KVM completes it on next entry)."""
        lib.mig_run_io(self._run, self._io)
        n = int(self._io.size) * int(self._io.count)
        if len(data) != n:
            raise ValueError(f"IN on port {int(self._io.port):#x} wants {n} bytes, got {len(data)}")
        ffi.memmove(ffi.cast("char *", self._run_ptr) + self._io.data_offset, data, n)

    # -- registers -----------------------------------------------------------------

    def _get(self, name: str) -> Any:
        _, ctype, get_req, _ = _PART_IOCTLS[name]
        c = ffi.new(ctype + " *")
        ioctl(self.fileno(), get_req, c, f"get {name} of vCPU {self.index}")
        return c

    def _set(self, name: str, c: Any) -> None:
        _, _, _, set_req = _PART_IOCTLS[name]
        ioctl(self.fileno(), set_req, c, f"set {name} of vCPU {self.index}")

    def get_regs(self) -> Regs:
        return Regs._from_c(self._get("regs"))

    def set_regs(self, regs: Regs) -> None:
        c = ffi.new("struct kvm_regs *")
        regs._to_c(c)
        self._set("regs", c)

    def get_sregs(self) -> Sregs:
        return Sregs._from_c(self._get("sregs"))

    def set_sregs(self, sregs: Sregs) -> None:
        c = self._get("sregs")  # keeps the interrupt bitmap as it is
        sregs._to_c(c)
        self._set("sregs", c)

    # -- whole state ---------------------------------------------------------------

    def get_state(self) -> VcpuState:
        """Capture the complete vCPU state (vCPU must be outside KVM_RUN)."""
        parts = {name: bytes(ffi.buffer(self._get(name))) for name in self._parts}
        indices = self.vm.kvm.msr_indices()
        msrs: list[tuple[int, int]] = []
        pending = list(indices)
        while pending:
            idx = ffi.new("uint32_t[]", pending)
            vals = ffi.new("uint64_t[]", len(pending))
            n = check(
                lib.mig_get_msrs(self.fileno(), idx, vals, len(pending)),
                f"KVM_GET_MSRS(vCPU {self.index})",
            )
            msrs.extend((pending[i], int(vals[i])) for i in range(n))
            # KVM stops at the first MSR it cannot read for this vCPU: skip that one.
            pending = pending[n + 1 :]
        return VcpuState(index=self.index, parts=parts, msrs=tuple(msrs))

    def set_state(self, state: VcpuState) -> None:
        """Restore a state captured by :meth:`get_state` (possibly in another process).

        Raises OSError naming the part or MSR KVM refused.
        """
        for name in STRUCT_PARTS:
            blob = state.parts.get(name)
            if blob is None:
                continue
            if name not in _PART_IOCTLS or (name not in self._parts and name != "fpu"):
                raise OSError(errno.EOPNOTSUPP, f"this host cannot restore vCPU part {name!r}")
            _, ctype, _, _ = _PART_IOCTLS[name]
            size = ffi.sizeof(ctype)
            if len(blob) != size:
                raise ValueError(f"vCPU part {name!r} is {len(blob)} bytes, this host uses {size}")
            c = ffi.new(ctype + " *")
            ffi.memmove(c, blob, size)
            self._set(name, c)
            if name == "sregs" and state.msrs:
                self._set_msrs(state.msrs)

    def _set_msrs(self, msrs: tuple[tuple[int, int], ...]) -> None:
        # KVM_SET_MSRS stops at the first MSR it refuses.  Some MSRs KVM lists cannot
        # be written back on every host (e.g. MSR_KVM_POLL_CONTROL under kvm_pvm); a
        # refused MSR that already holds the wanted value is no loss, anything else is.
        pending = list(msrs)
        while pending:
            idx = ffi.new("uint32_t[]", [m[0] for m in pending])
            vals = ffi.new("uint64_t[]", [m[1] for m in pending])
            n = check(
                lib.mig_set_msrs(self.fileno(), idx, vals, len(pending)),
                f"KVM_SET_MSRS(vCPU {self.index})",
            )
            if n == len(pending):
                return
            index, wanted = pending[n]
            got = ffi.new("uint64_t[]", 1)
            one = ffi.new("uint32_t[]", [index])
            if lib.mig_get_msrs(self.fileno(), one, got, 1) != 1 or int(got[0]) != wanted:
                raise OSError(
                    errno.EINVAL,
                    f"KVM_SET_MSRS(vCPU {self.index}) refused MSR {index:#x} = {wanted:#x}",
                )
            pending = pending[n + 1 :]

    # -- pre-fault -----------------------------------------------------------------

    def pre_fault_memory(self, gpa: int, nbytes: int) -> PreFaultResult:
        """KVM_PRE_FAULT_MEMORY over ``[gpa, gpa+nbytes)``, repeated as documented
        until the range is done.  Call it only on ranges whose pages are installed.

        Returns ``supported=False`` on EOPNOTSUPP/ENOTTY; other errors raise OSError.
        """
        g = ffi.new("uint64_t *", gpa)
        s = ffi.new("uint64_t *", nbytes)
        calls = 0
        while int(s[0]) > 0:
            calls += 1
            rc = lib.mig_pre_fault_memory(self.fileno(), g, s)
            if rc in (-errno.EOPNOTSUPP, -errno.ENOTTY) and calls == 1:
                return PreFaultResult(False, 0, calls)
            if rc in (-errno.EINTR, -errno.EAGAIN):
                continue
            before = int(s[0])
            check(rc, f"KVM_PRE_FAULT_MEMORY(gpa {gpa:#x}, {nbytes:#x} bytes)")
            if int(s[0]) == before:  # no progress and no error: do not spin
                break
        return PreFaultResult(True, nbytes - int(s[0]), calls)

    def close(self) -> None:
        if self._fd >= 0:
            lib.munmap(self._run_ptr, self._run_size)
            os.close(self._fd)
            self._fd = -1
