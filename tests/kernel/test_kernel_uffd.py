"""userfaultfd on the real kernel, including faults KVM takes on behalf of a vCPU."""

from __future__ import annotations

import select
import threading

import pytest

from migrated.kernel import (
    ExitReason,
    GuestMemory,
    UffdEventKind,
    UffdFeature,
    Userfaultfd,
    VcpuExit,
)

from .realmode import CODE_GPA, realmode_vm

pytestmark = pytest.mark.uffd

# mov al, [0x5000] ; out 0x10, al ; mov al, [0x7000] ; out 0x10, al ; hlt
READ_TWO_PAGES = bytes.fromhex("a00050e610a00070e610f4")


def test_features_are_negotiated_and_reported() -> None:
    with Userfaultfd.open(UffdFeature.THREAD_ID) as uffd:
        assert UffdFeature.THREAD_ID in uffd.available
        assert uffd.features == UffdFeature.THREAD_ID
        assert uffd.fileno() >= 0
    uffd.close()


def test_copy_zeropage_and_eexist_are_results() -> None:
    with GuestMemory.create(16 * 4096) as mem, Userfaultfd.open() as uffd:
        uffd.register(mem.address, mem.nbytes)
        page = bytes(range(256)) * 16
        r = uffd.copy(mem.address + 4096, page * 2, 8192)
        assert (r.installed, r.already_present) == (8192, 0)
        # A run overlapping an installed page installs the rest and reports the race.
        r = uffd.copy(mem.address, page * 3, 3 * 4096)
        assert (r.installed, r.already_present) == (4096, 8192)
        r = uffd.zeropage(mem.address, 4 * 4096)
        assert (r.installed, r.already_present) == (4096, 3 * 4096)
        assert bytes(mem.view[4096:8192]) == page
        assert bytes(mem.view[3 * 4096 : 4 * 4096]) == bytes(4096)
        uffd.unregister(mem.address, mem.nbytes)


def test_vcpu_blocks_on_missing_page_until_installed() -> None:
    with (
        realmode_vm(READ_TWO_PAGES, write_code=False) as rm,
        Userfaultfd.open(UffdFeature.THREAD_ID) as uffd,
    ):
        mem = rm.memory
        uffd.register(mem.address, mem.nbytes)
        code = bytearray(4096)
        code[: len(READ_TWO_PAGES)] = READ_TWO_PAGES
        uffd.copy(mem.address + CODE_GPA, code, 4096)

        exits: list[VcpuExit] = []
        tid: list[int] = []

        def vcpu_thread() -> None:
            tid.append(threading.get_native_id())
            while True:
                ex = rm.vcpu.run()
                exits.append(ex)
                if ex.reason is not ExitReason.IO:
                    return

        t = threading.Thread(target=vcpu_thread)
        t.start()
        served = []
        poller = select.poll()
        poller.register(uffd.fileno(), select.POLLIN)
        for expect_gpa, fill in ((0x5000, 0xA5), (0x7000, None)):
            assert poller.poll(10_000), "no fault arrived within 10 s"
            events = uffd.read_events()
            assert len(events) == 1 and events[0].kind is UffdEventKind.PAGEFAULT
            assert events[0].address & ~0xFFF == mem.address + expect_gpa
            assert events[0].thread_id == tid[0]
            served.append(expect_gpa)
            assert t.is_alive(), "the vCPU must wait for the page"
            if fill is None:
                uffd.zeropage(mem.address + expect_gpa, 4096)
            else:
                uffd.copy(mem.address + expect_gpa, bytes([fill]) * 4096, 4096)
        t.join(10)
        assert not t.is_alive()
        assert [e.data for e in exits if e.reason is ExitReason.IO] == [b"\xa5", b"\x00"]
        assert exits[-1].reason is ExitReason.HLT
        assert served == [0x5000, 0x7000]
