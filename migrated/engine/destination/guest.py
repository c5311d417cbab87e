"""The guest on the destination: restored at VmState, run at Commit, done at Complete.

``VmState`` is restored into a VM that does not run yet (``restore``) and answered with
``Ready``; ``Commit`` starts its vCPUs — from then on faults are served (``faults``) and
installed ranges are pre-faulted (``prefault``) — and is answered with ``Running``.
Once every page is installed the destination sends ``Complete`` and is done: it
releases its threads and userfaultfd, and the VM is like any other here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import partial
from typing import TYPE_CHECKING

from migrated.errors import MigratedError
from migrated.protocol import (
    AllSent,
    Commit,
    Complete,
    CompleteAck,
    Error,
    ErrorCode,
    PageRequest,
    Ready,
    Running,
    Switchover,
    VmState,
)
from migrated.protocol.state import MigrationState
from migrated.transport.channel import Channel

from ..stats import StepTimer
from .faults import FaultService
from .prefault import PreFaulter
from .restore import prepare, start, teardown

if TYPE_CHECKING:
    from .engine import DestinationEngine

__all__ = [
    "finish",
    "maybe_complete",
    "on_all_sent",
    "on_commit",
    "on_complete_ack",
    "on_switchover",
    "on_vm_state",
    "release",
]

S = MigrationState
_BULK_GRACE_S = 5.0
_SWEEP_INTERVAL_S = 1.0


def on_switchover(eng: DestinationEngine, ch: Channel, s: Switchover) -> None:
    eng.t_switch = time.monotonic()
    eng.stats.precopy_s = eng.t_switch - eng.t0 - eng.stats.setup_s
    eng.state_event()


def on_vm_state(eng: DestinationEngine, ch: Channel, v: VmState) -> None:
    assert v.data is not None
    if eng.t_switch:  # discards, final and resident pages, the state itself
        steps = eng.stats.downtime_breakdown_ms
        steps["switchover-frames"] = round((time.monotonic() - eng.t_switch) * 1e3, 3)
    eng.own(prepare_guest(eng, bytes(v.data)))


async def prepare_guest(eng: DestinationEngine, state_bytes: bytes) -> None:
    assert eng.store is not None and eng.memory is not None and eng.link is not None
    try:
        eng.prepared = await prepare(
            state_bytes,
            eng.memory,
            eng.store,
            backend=eng.backend,
            console=eng.opts.console,
            shell=eng.shell,
            steps=eng.stats.downtime_breakdown_ms,
        )
    except MigratedError as exc:
        code = getattr(exc, "code", ErrorCode.RESTORE_FAILED)
        eng.log.error("cannot restore the VM: %s", exc)
        with contextlib.suppress(MigratedError):  # gone too: the source resumes anyway
            eng.link.send_main(Error(code, f"destination: {exc}"[:4000]))
        eng.fail(f"could not restore the VM here: {exc}")
        return
    eng.memory = None  # the machine owns it now
    eng.shell = None  # adopted by the machine (or closed: it did not fit)
    if eng.state is not S.DEVICE:
        return  # the session ended meanwhile: _release tears it down
    eng.link.send_main(Ready())
    eng.t_ready = time.monotonic()
    eng.log.info("holding the complete VM state; Ready sent, waiting for Commit")
    eng.state_event()


def on_commit(eng: DestinationEngine, ch: Channel, c: Commit) -> None:
    steps = eng.stats.downtime_breakdown_ms
    if eng.t_ready:
        steps["wait-commit"] = round((time.monotonic() - eng.t_ready) * 1e3, 3)
    run_guest(eng, StepTimer(steps))


def run_guest(eng: DestinationEngine, steps: StepTimer) -> None:
    assert eng.prepared is not None and eng.store is not None and eng.link is not None
    uffd = eng.prepared.uffd
    if uffd is not None:
        eng.faults = FaultService(
            eng.store, uffd, eng.stats, partial(send_request, eng), partial(fault_failure, eng)
        )
        eng.faults.tid_to_vcpu = eng.prepared.machine.vcpu_thread_ids()
        eng.faults.start()
    steps.mark("fault-service")
    try:
        start(eng.prepared)
    except MigratedError as exc:  # it stopped since it was loaded: nothing runs here
        eng.stats.error = f"the restored VM cannot run: {exc}"
        eng.log.error("%s; the source holds the VM paused, committed", eng.stats.error)
        eng.state_event()
        return
    steps.mark("start-vcpus")
    eng.guest_started = True
    eng.t_running = time.monotonic()
    eng.stats.downtime_s = eng.t_running - (eng.t_switch or eng.t_running)
    try:
        eng.link.send_main(Running())  # first: the source's downtime ends with it
    except MigratedError as exc:
        eng.log.info("Running not sent: %s", exc)
    steps.mark("running-sent")
    eng.log.event("switchover", "the guest runs here (Commit received)")
    eng.state_event()
    if eng.opts.prefault:
        eng.prefaulter = PreFaulter(eng.prepared.machine)
        page, _ = eng.store.received.find_run(0, True)
        eng.prefaulter.start(None if page < 0 else eng.store.ram.gpa_of_page(page))
    maybe_complete(eng)


def send_request(eng: DestinationEngine, req: PageRequest) -> bool:
    link = eng.link
    if link is None or eng.state is not S.POSTCOPY_ACTIVE:
        return False
    ch = link.urgent or link.main
    if ch is None:
        return False
    try:
        ch.send(req)
    except MigratedError:
        return False
    return True


def fault_failure(eng: DestinationEngine, exc: BaseException) -> None:
    eng.stats.error = f"fault service failed: {exc}"
    eng.log.error("%s", eng.stats.error)
    eng.state_event()


def on_all_sent(eng: DestinationEngine, ch: Channel, a: AllSent) -> None:
    eng.all_sent = True
    maybe_complete(eng)


def sweep_if_stuck(eng: DestinationEngine) -> None:
    """After AllSent, with no BULK connection left, ask for what is still missing
    (called on each progress tick, so a lost page is asked for again until it came)."""
    if eng.all_sent and not eng.complete_sent and not eng.bulk and eng.faults is not None:
        now = time.monotonic()
        if now - eng.last_sweep >= _SWEEP_INTERVAL_S:
            eng.last_sweep = now
            eng.faults.sweep()


def maybe_complete(eng: DestinationEngine, *, force: bool = False) -> None:
    """Send Complete once every page is here (``force``: the bitmap said so)."""
    store, link = eng.store, eng.link
    if eng.complete_sent or store is None or link is None or not eng.guest_started:
        return
    if not (force or store.complete) or eng.state is not S.POSTCOPY_ACTIVE or link.main is None:
        return
    link.send_main(Complete(store.total_pages))  # the destination's part is done
    eng.complete_sent = True
    eng.own(finish(eng))


def on_complete_ack(eng: DestinationEngine, ch: Channel, a: CompleteAck) -> None:
    eng.log.info("the source released its copy of the VM")


async def finish(eng: DestinationEngine) -> None:
    await release(eng, keep_guest=True)
    now = time.monotonic()
    eng.stats.postcopy_s = now - eng.t_running
    eng.stats.total_s = now - eng.t0
    eng.log.event("completed", "migration completed in %.3f s", eng.stats.total_s)
    eng.state_event()
    if eng.done is not None and not eng.done.done():
        eng.done.set_result(None)


async def release(eng: DestinationEngine, *, keep_guest: bool) -> None:
    """Stop and join every thread, close userfaultfd; without ``keep_guest`` also
    destroy the VM and its memory (the guest never ran here).  On completion a BULK
    connection is left for the source to close (it does once its push ended, §1), for
    a grace period: closing it under the source's last writes would read as a lost
    link there."""
    for receiver in list(eng.bulk):
        if keep_guest:
            await asyncio.wait([receiver.worker.done], timeout=_BULK_GRACE_S)
        receiver.worker.stop()
        try:
            await receiver.worker.join()
        except MigratedError as exc:
            eng.log.info("BULK receiver ended: %s", exc)
    if eng.installer is not None:
        await eng.installer.close()
        eng.installer = None
    if eng.faults is not None:
        eng.faults.stop()
        eng.faults = None
    if eng.prefaulter is not None:
        eng.stats.prefault = eng.prefaulter.report()
        await eng.prefaulter.close()
        eng.prefaulter = None
    if eng.store is not None:
        eng.stats.install_s = eng.store.install_s
        eng.stats.duplicate_pages = eng.store.duplicate_pages
        if eng.store.reservation is not None:
            eng.store.reservation.close()
            eng.store.reservation = None
    if eng.shield is not None:
        eng.shield.close()  # complete here, or never ran here: no longer the only copy
        eng.shield = None
    prepared = eng.prepared
    if keep_guest and prepared is not None:
        if prepared.uffd is not None:
            for r in prepared.machine.regions:
                prepared.uffd.unregister(r.memory.address, r.memory.nbytes)
            prepared.uffd.close()
            prepared.uffd = None
        return
    eng.prepared = None
    if eng.shell is not None:
        eng.shell.close()  # idempotent; before the memory its slot maps
        eng.shell = None
    await teardown(prepared, eng.memory)
    eng.memory = None
