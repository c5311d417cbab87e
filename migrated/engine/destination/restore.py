"""Turning received state into a VM: registration, restore, start, teardown.

Facts we rely on:

* All guest RAM is registered with userfaultfd (MISSING mode) *before* any vCPU can
  run, so a vCPU touching a page that has not arrived faults instead of reading zeros.
  When every page has arrived (precopy mode) nothing is registered.
* The KVM VM, its RAM slot and vCPUs are built at Setup (``Backend.prebuild``, a
  :class:`VmShell`), out of the downtime.  At VmState ``Machine.restore`` adopts them
  and the vCPU threads load their state and park before their first KVM_RUN
  (``start(paused=True)``): nothing runs and no guest memory is touched, so a fault
  cannot happen before the fault service runs.  Both block (KVM ioctls, thread
  starts), so they run off the event loop.  ``Commit`` only lets the parked vCPUs go
  (:func:`start`, non-blocking, on the loop).
* Before Commit, nothing here is the guest's: a failed or cancelled migration tears it
  all down (:func:`teardown`), and the source keeps the VM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from migrated.errors import MigratedError, RemoteProtocolError
from migrated.kernel import GuestMemory, PageMap, UffdFeature, Userfaultfd
from migrated.protocol import ErrorCode
from migrated.vmm import Machine, VmShell
from migrated.vmm.state import VmState as MachineState

from ..stats import StepTimer
from .pages import NewPageMap, PageStore

__all__ = ["KVM", "Backend", "Prepared", "prebuild", "prepare", "start", "teardown"]


@dataclass
class Prepared:
    """A VM restored from its state, vCPUs not started."""

    machine: Machine
    uffd: Userfaultfd | None


def _restore_machine(
    state_bytes: bytes, memory: GuestMemory, console: str | None, shell: VmShell | None
) -> Machine:
    try:
        state = MachineState.from_bytes(state_bytes)
    except MigratedError as exc:
        raise RemoteProtocolError(
            f"cannot restore the VM from its state: {exc}", code=ErrorCode.RESTORE_FAILED
        ) from exc
    if shell is not None and not shell.fits(memory, len(state.vcpus)):
        shell.close()  # built for what Setup said; the state says otherwise
        shell = None
    try:
        return Machine.restore(state, memory=memory, own_memory=True, console=console, shell=shell)
    except MigratedError as exc:
        raise RemoteProtocolError(
            f"cannot restore the VM here: {exc}", code=ErrorCode.RESTORE_FAILED
        ) from exc


def _open_uffd() -> Userfaultfd:
    return Userfaultfd.open(UffdFeature.THREAD_ID)


def _prebuild(memory: GuestMemory, vcpus: int) -> VmShell:
    return VmShell(memory, vcpus)


@dataclass(frozen=True)
class Backend:
    """How the destination turns a state into a VM and gets a userfaultfd: KVM's and
    the kernel's (:data:`KVM`), or a test's in-memory fakes.  ``prebuild`` makes,
    at Setup, what ``restore`` may adopt at VmState (its last argument; None when
    there is none).  ``restore`` raises RemoteProtocolError (code ``restore-failed``)
    for a state it cannot restore."""

    restore: Callable[[bytes, GuestMemory, str | None, Any], Machine]
    open_uffd: Callable[[], Userfaultfd]
    new_pagemap: NewPageMap = PageMap
    prebuild: Callable[[GuestMemory, int], Any] | None = None


KVM = Backend(_restore_machine, _open_uffd, prebuild=_prebuild)


def _prepare(
    backend: Backend,
    state_bytes: bytes,
    memory: GuestMemory,
    store: PageStore,
    console: str | None,
    shell: Any,
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
        machine = backend.restore(state_bytes, memory, console, shell)
    except BaseException:
        if uffd is not None:
            uffd.close()
        raise
    mark("create-vm")
    try:
        # Each vCPU thread loads its state and parks before its first KVM_RUN (no
        # guest memory touched); Commit only lets them go (:func:`start`).
        machine.start(paused=True)
    except MigratedError as exc:
        machine.close()
        if uffd is not None:
            uffd.close()
        raise RemoteProtocolError(
            f"cannot load the vCPU state here: {exc}", code=ErrorCode.RESTORE_FAILED
        ) from exc
    except BaseException:
        machine.close()
        if uffd is not None:
            uffd.close()
        raise
    mark("load-vcpus")
    return Prepared(machine, uffd)


async def prebuild(backend: Backend, memory: GuestMemory, vcpus: int) -> Any:
    """``backend.prebuild`` off the loop (None when it has none).  If the caller is
    cancelled meanwhile, the shell is closed once built: never left open."""
    if backend.prebuild is None:
        return None
    fut = asyncio.get_running_loop().run_in_executor(None, backend.prebuild, memory, vcpus)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_close_built)
        raise


def _close_built(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is None and fut.result() is not None:
        fut.result().close()


async def prepare(
    state_bytes: bytes,
    memory: GuestMemory,
    store: PageStore,
    *,
    backend: Backend = KVM,
    console: str | None,
    shell: Any = None,
    steps: dict[str, float],
) -> Prepared:
    """Register guest RAM, then create the VM from its state, adopting ``shell``
    (from ``backend.prebuild``) when it fits, its vCPUs loaded and parked.  Raises
    RemoteProtocolError (code ``restore-failed``) when the state cannot be restored;
    the caller answers Error and tears down (and closes the shell: idempotent)."""
    return await asyncio.to_thread(
        _prepare, backend, state_bytes, memory, store, console, shell, steps
    )


def start(prepared: Prepared) -> None:
    """Let the parked vCPUs run (after Commit): a flag and a wake-up, never blocks."""
    prepared.machine.resume()


async def teardown(prepared: Prepared | None, memory: GuestMemory | None) -> None:
    """Release everything of a migration whose guest never ran here."""
    if prepared is not None:
        await asyncio.to_thread(prepared.machine.close)  # closes the memory it owns
        if prepared.uffd is not None:
            prepared.uffd.close()
    elif memory is not None:
        memory.close()
