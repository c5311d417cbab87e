"""One VM process: the machine it hosts, its control socket, the migration in flight.

``migrated run`` boots a VM here; ``migrated recv`` waits here for an incoming one and
then keeps running it.  Either way the process serves its control socket until the
VM stops, crashes or migrates away.  Every task belongs to :meth:`VmHost.serve`'s
TaskGroup; nothing runs unowned.

Stopping is refused while the VM is split between two hosts (postcopy after the point
of no return): killing either side then would lose the VM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any

from migrated.engine.destination import DestinationEngine, RecvOptions
from migrated.engine.source import Mode, SendOptions, SourceEngine
from migrated.errors import ConfigError, MigratedError, MigrationAborted
from migrated.vmm import Machine, Runstate, VmConfig, install_kick_handler

from .control import ControlServer, Emit

__all__ = ["VmHost", "machine_status"]


def machine_status(machine: Machine | None) -> dict[str, Any]:
    if machine is None:
        return {"runstate": "none"}
    st = machine.status()
    vcpus = []
    for v in st.vcpus:
        vcpus.append(
            {
                "index": v.index,
                "runstate": v.runstate.value,
                "last_report": v.last_report.text if v.last_report else None,
                "last_report_ok": v.last_report.ok if v.last_report else None,
                "writes": v.last_progress.args[0] if v.last_progress else None,
                "crash": v.crash.describe() if v.crash else None,
            }
        )
    return {
        "name": st.name,
        "uuid": st.uuid,
        "runstate": st.runstate.value,
        "memory_bytes": st.memory_bytes,
        "console_bytes": st.console_bytes,
        "vcpus": vcpus,
    }


class VmHost:
    """Owns the machine and the migration of one VM process."""

    def __init__(self, control_path: str | None, *, printer: Emit | None = None) -> None:
        self.control_path = control_path
        self._machine: Machine | None = None
        self.source: SourceEngine | None = None
        self.destination: DestinationEngine | None = None
        self.last_migration: dict[str, Any] | None = None
        self.exit_code = 0
        self.exit_reason = ""
        self._print: Emit = printer or (lambda e: None)
        self._done = asyncio.Event()
        self._control: ControlServer | None = None

    @property
    def machine(self) -> Machine | None:
        """The VM this process hosts.  While a migration comes in, that is the
        destination engine's machine from the moment the guest runs here (postcopy),
        long before the engine returns."""
        if self._machine is None and self.destination is not None:
            return self.destination.machine
        return self._machine

    @machine.setter
    def machine(self, value: Machine | None) -> None:
        self._machine = value

    # -- lifecycle ---------------------------------------------------------------------

    async def serve(self, start: Callable[[], Any]) -> int:
        """Run the control socket and ``start()`` (a coroutine function that creates
        the machine) until the VM is gone.  Returns the process exit code."""
        install_kick_handler()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.control_path:
            self._control = ControlServer(self.control_path, self._handlers())
            await self._control.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._start_then_watch(start))
                await self._done.wait()
                raise _Shutdown()
        except* _Shutdown:
            pass
        finally:
            if self._control is not None:
                await self._control.close()
            if self.machine is not None:
                self.machine.close()
        return self.exit_code

    async def _start_then_watch(self, start: Callable[[], Any]) -> None:
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
                and self.source is None
            ):
                crash = m.crash
                self.finish(1 if crash else 0, crash.describe() if crash else "the VM stopped")
                return
            await asyncio.sleep(0.2)

    def finish(self, code: int, reason: str) -> None:
        self.exit_code, self.exit_reason = code, reason
        self._print({"event": "exit", "exit_code": code, "reason": reason})
        self._done.set()

    def _split(self) -> bool:
        """True while stopping this process would lose the VM."""
        for eng in (self.source, self.destination):
            if (
                eng is not None
                and eng.session.point_of_no_return
                and eng.session.state.value != "completed"
            ):
                return True
        return False

    def _on_signal(self, sig: int) -> None:
        if self._split():
            print(
                f"migrated: ignoring {signal.Signals(sig).name}: postcopy is in progress and "
                "stopping now would lose the VM; finish or recover the migration first",
                file=sys.stderr,
            )
            return
        self.finish(0, f"stopped by {signal.Signals(sig).name}")

    # -- starting ----------------------------------------------------------------------

    async def boot(self, config: VmConfig) -> None:
        self.machine = Machine.boot(config)
        self.machine.start()
        self._print(
            {
                "event": "running",
                "name": config.name,
                "memory_bytes": config.memory_bytes,
                "vcpus": config.vcpus,
            }
        )

    async def receive(self, host: str, port: int, options: RecvOptions) -> None:
        self.destination = DestinationEngine(host, port, options, emit=self._print)
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

    # -- control commands --------------------------------------------------------------

    def _handlers(self) -> dict[str, Any]:
        return {
            "status": self._cmd_status,
            "verify": self._cmd_verify,
            "migrate": self._cmd_migrate,
            "postcopy": self._cmd_postcopy,
            "cancel": self._cmd_cancel,
            "recover": self._cmd_recover,
            "stop": self._cmd_stop,
            "cont": self._cmd_cont,
        }

    def _migration_status(self) -> dict[str, Any] | None:
        eng = self.source or self.destination
        if eng is None:
            return self.last_migration
        d = eng.stats.to_dict()
        d["status"] = eng.session.state.value
        return d

    async def _cmd_status(self, req: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return {
            "vm": machine_status(self.machine),
            "migration": self._migration_status(),
            "port": self.destination.port if self.destination else None,
        }

    async def _cmd_verify(self, req: dict[str, Any], emit: Emit) -> dict[str, Any]:
        m = self._require_machine()
        timeout_s = float(req.get("timeout_s", 60))
        reports = await asyncio.get_running_loop().run_in_executor(
            None, lambda: m.verify(timeout_s)
        )
        return {"ok": all(r.ok for r in reports), "reports": [r.text for r in reports]}

    async def _cmd_migrate(self, req: dict[str, Any], emit: Emit) -> dict[str, Any]:
        m = self._require_machine()
        if self.source is not None:
            raise ConfigError(
                "a migration of this VM is already running",
                hint="watch it with `migrated status` or cancel it",
            )
        if m.runstate is not Runstate.RUNNING:
            raise ConfigError(f"the VM is {m.runstate.value}, not running; nothing to migrate")
        host, port = parse_address(str(req.get("to", "")))
        opts = send_options(req)
        self.source = engine = SourceEngine(m, host, port, opts, emit=emit)
        try:
            stats = await engine.run()
        except MigratedError:
            self.last_migration = engine.stats.to_dict()
            if not engine.session.point_of_no_return:
                self.source = None  # the VM runs here again; another attempt is allowed
            raise
        self.last_migration = stats.to_dict()
        self.machine = None  # destroyed by the engine: the VM lives elsewhere now
        self.source = None
        # Leave after this reply has gone out.
        asyncio.get_running_loop().call_later(
            0.2, self.finish, 0, f"the VM migrated to {host}:{port}"
        )
        return {"status": "completed", "stats": self.last_migration, "exit_code": 0}

    async def _cmd_postcopy(self, req: dict[str, Any], emit: Emit) -> dict[str, Any]:
        if self.source is None:
            raise ConfigError("no outgoing migration is running")
        self.source.request_switchover()
        return {"ok": True}

    async def _cmd_cancel(self, req: dict[str, Any], emit: Emit) -> dict[str, Any]:
        if self.source is None:
            raise ConfigError("no outgoing migration is running")
        if not self.source.cancel():
            raise ConfigError(
                f"cannot cancel in state {self.source.state.value}: postcopy is not cancellable "
                "(the destination may run the guest)",
                hint="let it complete, or recover it with `migrated recover`",
            )
        return {"ok": True}

    async def _cmd_recover(self, req: dict[str, Any], emit: Emit) -> dict[str, Any]:
        if self.source is None:
            raise ConfigError("no outgoing migration to recover here")
        host = port = None
        if req.get("to"):
            host, port = parse_address(str(req["to"]))
        self.source.recover_now(host, port)
        return {"ok": True, "status": self.source.state.value}

    async def _cmd_stop(self, req: dict[str, Any], emit: Emit) -> dict[str, Any]:
        if self._split() and not req.get("force"):
            raise ConfigError(
                "refusing to stop: postcopy is in progress and the VM is split "
                "between the two hosts",
                hint="wait for completion or recover",
            )
        asyncio.get_running_loop().call_soon(self.finish, 0, "stopped by the operator")
        return {"ok": True}

    async def _cmd_cont(self, req: dict[str, Any], emit: Emit) -> dict[str, Any]:
        m = self._require_machine()
        if self.source is not None and self.source.session.point_of_no_return:
            raise ConfigError("the destination has run this VM: it must never run here again")
        if m.runstate is Runstate.PAUSED:
            m.resume()
            self.source = None
        return {"runstate": m.runstate.value}

    def _require_machine(self) -> Machine:
        if self.machine is None:
            raise ConfigError("this process hosts no VM (yet)")
        return self.machine


class _Shutdown(Exception):
    pass


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[addr]:port``).  Raises ConfigError naming the text."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"bad address {text!r}: expected HOST:PORT, e.g. 10.0.0.2:4444")
    return host, int(port_text)


def send_options(req: dict[str, Any]) -> SendOptions:
    try:
        mode = Mode(req.get("mode", "hybrid"))
    except ValueError:
        raise ConfigError(
            f"bad mode {req.get('mode')!r}: use postcopy, hybrid or precopy"
        ) from None
    kw: dict[str, Any] = {"mode": mode}
    for key, conv in (
        ("max_precopy_rounds", int),
        ("recovery_timeout_s", float),
        ("precopy_time_limit_s", float),
        ("checksum", bool),
        ("bulk_channel", bool),
        ("frame_pages", int),
        ("precopy_bandwidth", int),
        ("postcopy_bandwidth", int),
    ):
        if req.get(key) is not None:
            kw[key] = conv(req[key])
    for key in ("precopy_bandwidth", "postcopy_bandwidth"):
        if kw.get(key, 0) < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must not be negative")
    if kw.get("max_precopy_rounds", 1) < 1:
        raise ConfigError("--max-precopy-rounds must be at least 1")
    if not 1 <= kw.get("frame_pages", 256) <= 1024:
        raise ConfigError("frame_pages must be 1..1024")
    return SendOptions(**kw)
