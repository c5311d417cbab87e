"""One VM process: the machine it hosts, its control socket, the migration in flight.

``migrated run`` boots a VM here; ``migrated recv`` waits here for an incoming one and
then keeps running it.  Either way the process serves its control socket until the VM
stops, crashes or migrates away.  Every task belongs to :meth:`VmHost.serve`'s
TaskGroup — the migrations too, so a control client that goes away leaves them
running — and the machine is closed only after every task has ended.

Stopping is refused while the VM is split between two hosts (after the commit) or
held in doubt (a destination in ``ready``): stopping either side then could lose the
VM.  Before the commit, stopping the source cancels the migration first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from migrated.engine import DestinationEngine, RecvOptions, SendOptions, SourceEngine, phase_name
from migrated.errors import MigratedError, MigrationAborted, StateError
from migrated.protocol.state import MigrationState
from migrated.transport.faults import FaultPlan
from migrated.transport.security import Security
from migrated.vmm import Machine, Runstate, VmConfig, install_kick_handler

from . import commands
from .control import ControlServer, Emit
from .outgoing import Outgoing

__all__ = ["VmHost"]

log = logging.getLogger(__name__)
S = MigrationState


class VmHost:
    """Owns the machine and the migrations of one VM process."""

    def __init__(
        self,
        control_path: str | None,
        *,
        printer: Emit | None = None,
        security: Security | None = None,
        fault: FaultPlan | None = None,
    ) -> None:
        self.control_path = control_path
        self.security = security or Security.plain()
        self.fault = fault
        self._machine: Machine | None = None
        self.outgoing: Outgoing | None = None
        self.destination: DestinationEngine | None = None
        self.last_migration: dict[str, Any] | None = None
        self.exit_code = 0
        self.exit_reason = ""
        #: Why this process is stopping while a migration runs (a signal), or "".
        self.stopping = ""
        self._print: Emit = printer or (lambda e: None)
        self._done = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._control: ControlServer | None = None

    @property
    def machine(self) -> Machine | None:
        """The VM this process hosts.  While a migration comes in, that is the
        destination engine's machine from the moment the guest runs here."""
        if self._machine is None and self.destination is not None:
            return self.destination.machine
        return self._machine

    @machine.setter
    def machine(self, value: Machine | None) -> None:
        self._machine = value

    # -- lifecycle ---------------------------------------------------------------------

    async def serve(self, start: Callable[[], Coroutine[Any, Any, None]]) -> int:
        """Run the control socket and ``start()`` (a coroutine function that creates
        the machine) until the VM is gone.  Returns the process exit code."""
        install_kick_handler()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.control_path:
            self._control = ControlServer(self.control_path, commands.handlers(self))
            await self._control.start()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._start_then_watch(start), name="migrated-vm")
                await self._done.wait()
                raise _Shutdown()
        except* _Shutdown:
            pass
        finally:
            self._tg = None
            if self._control is not None:
                await self._control.close()
            if self.destination is not None:
                await self.destination.close()
            machine = self.machine
            if machine is not None:
                await asyncio.to_thread(machine.close)
        return self.exit_code

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A task owned by this process (its TaskGroup)."""
        if self._tg is None:
            coro.close()
            raise StateError("this VM process is shutting down")
        return self._tg.create_task(self._guarded(coro, name), name=name)

    async def _guarded(self, coro: Coroutine[Any, Any, Any], name: str) -> Any:
        # A task's failure is its own outcome (recorded by the task), never a reason to
        # tear the process down: that would close the machine, and after a commit
        # lose the VM.  Only cancellation propagates.
        try:
            return await coro
        except MigratedError as exc:
            log.info("task %s ended: %s", name, exc)
        except Exception:
            log.exception("task %s failed (a bug in migrated)", name)
        return None

    async def _start_then_watch(self, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await start()
        except MigratedError as exc:
            self.finish(exc.exit_code, exc.describe())
            return
        while not self._done.is_set():
            m = self.machine
            if (
                m is not None
                and m.runstate in (Runstate.STOPPED, Runstate.CRASHED)
                and not (self.outgoing and self.outgoing.running)
            ):
                crash = m.crash
                self.finish(1 if crash else 0, crash.describe() if crash else "the VM stopped")
                return
            await asyncio.sleep(0.2)

    def finish(self, code: int, reason: str) -> None:
        self.exit_code, self.exit_reason = code, reason
        self._print({"event": "exit", "exit_code": code, "reason": reason})
        log.info("exiting (%d): %s", code, reason)
        self._done.set()

    def split_reason(self) -> str | None:
        """Why stopping this process now would risk the VM, or None."""
        out = self.outgoing
        if out is not None and out.committed and out.engine.state is not S.COMPLETED:
            return (
                f"the VM is split between this source and {out.engine.host}:{out.engine.port} "
                f"(postcopy {out.engine.state.value}): this host holds pages it has not sent"
            )
        dst = self.destination
        if dst is not None and dst.session is not None:
            if dst.state is S.READY:
                return "this destination holds the VM state in doubt (the source may commit it)"
            complete_here = dst.store is not None and dst.store.complete
            if dst.session.point_of_no_return and not complete_here:
                return f"postcopy is in progress ({dst.state.value}): pages are still arriving"
        return None

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        reason = self.split_reason()
        if reason is not None:
            log.warning("ignoring %s: %s; finish or recover the migration first", name, reason)
            self._print({"event": "signal-ignored", "signal": name, "reason": reason})
            return
        out = self.outgoing
        if out is not None and out.running:
            # Cancel first (the VM resumes here), tell the followers the truth, then stop.
            self.stopping = f"the source VM process received {name}"
            out.engine.cancel(self.stopping)
            self.spawn(self._stop_after(out, name), "migrated-stop")
            return
        self.finish(0, f"stopped by {name}")

    async def _stop_after(self, out: Outgoing, name: str) -> None:
        assert out.task is not None
        await asyncio.wait([out.task])
        asyncio.get_running_loop().call_later(0.2, self.finish, 0, f"stopped by {name}")

    # -- starting ----------------------------------------------------------------------

    async def boot(self, config: VmConfig) -> None:
        self.machine = await asyncio.to_thread(Machine.boot, config)
        await asyncio.to_thread(self.machine.start)
        log.info("VM %s running (%d MiB, %d vCPUs)", config.name, config.memory_mib, config.vcpus)
        self._print(
            {
                "event": "running",
                "name": config.name,
                "memory_bytes": config.memory_bytes,
                "vcpus": config.vcpus,
            }
        )

    async def receive(
        self,
        host: str,
        port: int,
        options: RecvOptions,
        admit: Callable[[int], None] | None = None,
    ) -> None:
        self.destination = DestinationEngine(
            host,
            port,
            options,
            emit=self._print,
            security=self.security,
            fault=self.fault,
            admit=admit,
        )
        try:
            self.machine = await self.destination.run()
        except MigrationAborted as exc:
            self.last_migration = self.destination.stats.to_dict()
            self._print(
                {
                    "event": "result",
                    "status": "failed",
                    "error": str(exc),
                    "stats": self.last_migration,
                }
            )
            raise
        self.last_migration = self.destination.stats.to_dict()
        self._print({"event": "result", "status": "completed", "stats": self.last_migration})

    # -- outgoing migrations -----------------------------------------------------------

    def migration_starting(self, host: str, port: int) -> None:
        """Hook, before the engine exists: a subclass persists what it must (systemd
        units write the ownership record here, so no commit can precede it)."""

    def migration_ended(self, out: Outgoing) -> None:
        """Hook, once an outgoing migration has ended (``out.stats`` on completion,
        ``out.error`` otherwise; ``out.committed`` says whether the VM left)."""

    def migration_status(self) -> dict[str, Any] | None:
        """The migration in flight (or the last one), as ``status`` reports it."""
        out, dst = self.outgoing, self.destination
        if out is not None and out.running:
            status = out.engine.stats.to_dict()
            status["status"] = out.engine.state.value
            status["reason"] = out.engine.session.lost_reason
            status["pages_remaining"] = out.engine.cursor.remaining
            return status
        if dst is not None and dst.session is not None and not dst.state.terminal:
            status = dst.stats.to_dict()
            status["status"] = dst.state.value
            status["reason"] = dst.session.lost_reason
            status["pages_installed"] = dst.store.count if dst.store is not None else 0
            return status
        return self.last_migration

    def start_migration(
        self, machine: Machine, host: str, port: int, opts: SendOptions
    ) -> Outgoing:
        self.migration_starting(host, port)
        out = Outgoing(
            SourceEngine(machine, host, port, opts, security=self.security, fault=self.fault),
            self.control_path or "SOCKET",
        )
        out.engine.emit = out.broadcast
        self.outgoing = out
        out.task = self.spawn(self._run_outgoing(out), "migrated-migration")
        return out

    async def _run_outgoing(self, out: Outgoing) -> Any:
        try:
            return await self._migrate(out)
        finally:
            self.migration_ended(out)

    async def _migrate(self, out: Outgoing) -> Any:
        eng = out.engine
        try:
            stats = await eng.run()
        except MigrationAborted as exc:
            out.error = exc
            if self.stopping:
                phase = phase_name(eng.session.table.before_end)
                out.error = MigrationAborted(
                    f"migration to {eng.host}:{eng.port} cancelled in {phase}: "
                    f"{self.stopping}, so it stops the VM; nothing runs on the destination",
                    hint="the VM was not migrated and is stopping: start it again with "
                    "`migrated run CONFIG` and migrate it with `migrated send`",
                )
            self.last_migration = eng.stats.to_dict()
            machine = self.machine
            if machine is not None and machine.runstate is Runstate.PAUSED:
                await asyncio.to_thread(machine.resume)  # abandoned after the commit
            if eng.needs_withdraw:
                self.spawn(self._withdraw(eng), "migrated-withdraw")
            raise
        out.stats = stats
        self.last_migration = stats.to_dict()
        machine, self.machine = self.machine, None
        if machine is not None:
            await asyncio.to_thread(machine.close)  # the VM lives on the destination now
        # Leave once the followers had the result.
        asyncio.get_running_loop().call_later(
            0.2, self.finish, 0, f"the VM migrated to {eng.host}:{eng.port}"
        )
        return stats

    async def _withdraw(self, eng: SourceEngine) -> None:
        """Tell a destination that may hold our state in doubt that we kept the VM;
        retried for as long as a recovery would be."""
        delay = 0.5
        loop = asyncio.get_running_loop()
        deadline = loop.time() + eng.opts.recovery_timeout_s
        while loop.time() < deadline:
            if await eng.withdraw():
                return
            await asyncio.sleep(delay)
            delay = min(2 * delay, eng.opts.max_retry_interval_s)
        log.warning(
            "could not tell %s:%d that the VM stayed here; if it holds the state in doubt, "
            "run `migrated cancel --force` there",
            eng.host,
            eng.port,
        )

    def require_machine(self) -> Machine:
        if self.machine is None:
            raise StateError("this process hosts no VM (yet)")
        return self.machine


class _Shutdown(Exception):
    pass
