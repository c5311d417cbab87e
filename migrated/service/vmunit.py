"""``migrated vm NAME``: one VM process under systemd (``migrated-vm@NAME``,
``migrated-incoming@NAME``).

It is :class:`~migrated.service.vmhost.VmHost` plus what a unit needs:

* paths from the host configuration: ``/etc/migrated/vms/NAME.toml``, the control
  socket ``/run/migrated/vm/NAME/control.sock``, the ownership record;
* the ownership guard (:mod:`.ownership`): never boot a VM that may run elsewhere;
  the record is written *before* the engine starts an outgoing migration, so no
  commit can happen without it on disk;
* sd_notify: ``READY=1`` once the VM runs (booted) or once the port listens
  (incoming: the daemon waits for that before telling the source), ``STATUS=`` with
  the VM's state and migration progress, ``WATCHDOG=1`` when ``WatchdogSec=`` is
  set, ``STOPPING=1`` on the way out;
* logging to journald with the VM's name on every record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from migrated.transport.faults import from_environment
from migrated.vmm import VmConfig

from .hostconfig import HostConfig
from .notify import Notifier
from .outgoing import Outgoing
from .ownership import Ownership
from .tls import build_security
from .vmhost import VmHost

__all__ = ["UnitVmHost", "describe"]

log = logging.getLogger(__name__)


def describe(status: dict[str, Any]) -> str:
    """One line for ``STATUS=`` from a VM process' ``status`` answer."""
    vm = status.get("vm") or {}
    mig = status.get("migration") or {}
    text = f"VM {vm.get('name') or '-'} {vm.get('runstate', 'none')}"
    state = mig.get("status")
    if state and state not in ("completed", "failed", "cancelled"):
        total = mig.get("total_pages") or 0
        pct = ""
        if mig.get("role") == "destination" and total:
            pct = f" {min(99, int(100 * mig.get('pages_installed', 0) / total))} %"
        elif mig.get("pages_remaining") is not None and total:
            pct = f" {min(99, int(100 * (1 - mig['pages_remaining'] / total)))} %"
        text += f", migration ({mig.get('role')}) {state}{pct}"
    elif state:
        text += f", last migration {state}"
    return text


class UnitVmHost(VmHost):
    def __init__(self, name: str, config: HostConfig, notifier: Notifier) -> None:
        self.name = name
        self.host_config = config
        self.notifier = notifier
        self.ownership = Ownership(config.state_path(name))
        self._progress: dict[str, Any] = {}
        self._claimed = False
        # Every migration channel of this VM (MAIN, URGENT, BULK) uses the host's TLS.
        super().__init__(
            config.control_path(name),
            printer=self._on_event,
            security=build_security(config.tls),
            fault=from_environment(),
        )

    # -- events of the process (boot, listen, exit) --------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "listening":
            self.notifier.ready(f"VM {self.name}: waiting for it on port {event.get('port')}")
            log.info("waiting for incoming VM %s on port %s", self.name, event.get("port"),
                     extra={"migrated_vm": self.name})  # fmt: skip
        elif kind == "exit":
            self.notifier.stopping(f"VM {self.name}: {event.get('reason')}")
            log.info("VM process exits (%s): %s", event.get("exit_code"), event.get("reason"),
                     extra={"migrated_vm": self.name})  # fmt: skip
        elif kind == "progress":
            self._progress = event
        elif kind == "state" and event.get("side") == "destination":
            self._claim_if_committed()

    async def boot(self, config: VmConfig) -> None:
        await super().boot(config)
        self.notifier.ready(f"VM {self.name} running")
        log.info("VM %s booted", self.name, extra={"migrated_vm": self.name})

    # -- the ownership record around outgoing migrations ---------------------------------

    def migration_starting(self, host: str, port: int) -> None:
        # On disk before the engine exists: no commit can precede it.
        self.ownership.write("outgoing", f"{host}:{port}")

    def migration_ended(self, out: Outgoing) -> None:
        peer = f"{out.engine.host}:{out.engine.port}"
        if out.stats is not None:
            self.ownership.write("away", peer)
        elif not out.committed or self.machine is not None:
            self.ownership.clear()  # the VM runs here (never committed, or abandoned)

    # -- status for systemd ------------------------------------------------------------

    def status_line(self) -> str:
        mig = self.migration_status() or {}
        if self._progress and mig.get("status") not in (None, "completed", "failed"):
            mig = {**mig, **{k: v for k, v in self._progress.items() if k != "status"}}
        from .commands import machine_status

        return describe({"vm": machine_status(self.machine), "migration": mig})

    def _claim_if_committed(self) -> None:
        """The ownership record says "here" from the moment an incoming VM is ours
        (the destination's session crossed the point of no return), written in the
        same step as the state change that announced it."""
        eng = self.destination
        if self._claimed or eng is None or eng.session is None:
            return
        if eng.session.point_of_no_return:
            self.ownership.write("here", "incoming")
            self._claimed = True
            log.info("VM %s now runs on this host", self.name,
                     extra={"migrated_vm": self.name})  # fmt: skip

    async def watch(self) -> None:
        """STATUS= every second (and the ownership claim, should a state event have
        been missed)."""
        while True:
            self._claim_if_committed()
            with contextlib.suppress(Exception):
                self.notifier.status(self.status_line())
            await asyncio.sleep(1.0)


async def serve_unit(host: UnitVmHost, start: Any) -> int:
    """``host.serve(start)`` with the watcher and the watchdog alongside; both end
    when the VM process ends."""
    tasks = [
        asyncio.create_task(host.watch()),
        asyncio.create_task(host.notifier.watchdog_loop()),
    ]
    try:
        return await host.serve(start)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
