"""Turning received state into a VM: registration, restore, start, teardown.

Facts we rely on:

* All guest RAM is registered with userfaultfd (MISSING mode) *before* any vCPU can
  run, so a vCPU touching a page that has not arrived faults instead of reading zeros.
  When every page has arrived (precopy mode) nothing is registered.
* ``Machine.restore`` creates the KVM VM and its vCPUs but runs nothing and never
  touches guest memory; the vCPUs start only after ``Commit`` (:func:`start`).  Both
  block (KVM ioctls, thread starts), so they run off the event loop.
* Before Commit, nothing here is the guest's: a failed or cancelled migration tears it
  all down (:func:`teardown`), and the source keeps the VM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from migrated.errors import MigratedError, RemoteProtocolError
from migrated.kernel import GuestMemory, PageMap, UffdFeature, Userfaultfd
from migrated.protocol import ErrorCode
from migrated.vmm import Machine
from migrated.vmm.state import VmState as MachineState

from ..stats import StepTimer
from .pages import NewPageMap, PageStore

__all__ = ["KVM", "Backend", "Prepared", "prepare", "start", "teardown"]


@dataclass
class Prepared:
    """A VM restored from its state, vCPUs not started."""

    machine: Machine
    uffd: Userfaultfd | None


def _restore_machine(state_bytes: bytes, memory: GuestMemory, console: str | None) -> Machine:
    try:
        state = MachineState.from_bytes(state_bytes)
    except MigratedError as exc:
        raise RemoteProtocolError(
            f"cannot restore the VM from its state: {exc}", code=ErrorCode.RESTORE_FAILED
        ) from exc
    try:
        return Machine.restore(state, memory=memory, own_memory=True, console=console)
    except MigratedError as exc:
        raise RemoteProtocolError(
            f"cannot restore the VM here: {exc}", code=ErrorCode.RESTORE_FAILED
        ) from exc


def _open_uffd() -> Userfaultfd:
    return Userfaultfd.open(UffdFeature.THREAD_ID)


@dataclass(frozen=True)
class Backend:
    """How the destination turns a state into a VM and gets a userfaultfd: KVM's and
    the kernel's (:data:`KVM`), or a test's in-memory fakes.  ``restore`` raises
    RemoteProtocolError (code ``restore-failed``) for a state it cannot restore."""

    restore: Callable[[bytes, GuestMemory, str | None], Machine]
    open_uffd: Callable[[], Userfaultfd]
    new_pagemap: NewPageMap = PageMap


KVM = Backend(_restore_machine, _open_uffd)


def _prepare(
    backend: Backend,
    state_bytes: bytes,
    memory: GuestMemory,
    store: PageStore,
    console: str | None,
    steps: dict[str, float],
) -> Prepared:
    mark = StepTimer(steps).mark
    uffd = None
    if not store.complete:
        uffd = backend.open_uffd()
        try:
            for r in store.ram.regions:
                uffd.register(r.memory.address, r.memory.nbytes)
        except BaseException:
            uffd.close()
            raise
    store.seal(uffd)
    mark("userfaultfd-register")
    try:
        machine = backend.restore(state_bytes, memory, console)
    except BaseException:
        if uffd is not None:
            uffd.close()
        raise
    mark("create-vm")
    return Prepared(machine, uffd)


async def prepare(
    state_bytes: bytes,
    memory: GuestMemory,
    store: PageStore,
    *,
    backend: Backend = KVM,
    console: str | None,
    steps: dict[str, float],
) -> Prepared:
    """Register guest RAM, then create the VM from its state (not started).  Raises
    RemoteProtocolError (code ``restore-failed``) when the state cannot be restored;
    the caller answers Error and tears down."""
    return await asyncio.to_thread(_prepare, backend, state_bytes, memory, store, console, steps)


async def start(prepared: Prepared) -> dict[int, int]:
    """Start the vCPUs (after Commit).  Returns thread id -> vCPU index."""
    machine = prepared.machine
    await asyncio.to_thread(machine.start)
    return machine.vcpu_thread_ids()


async def teardown(prepared: Prepared | None, memory: GuestMemory | None) -> None:
    """Release everything of a migration whose guest never ran here."""
    if prepared is not None:
        await asyncio.to_thread(prepared.machine.close)  # closes the memory it owns
        if prepared.uffd is not None:
            prepared.uffd.close()
    elif memory is not None:
        memory.close()
