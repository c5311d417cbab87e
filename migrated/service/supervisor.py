"""VM processes as systemd units, driven with ``systemctl``.

Each VM runs in its own unit, a child of systemd, not of the daemon:

* ``migrated-vm@NAME.service`` boots ``/etc/migrated/vms/NAME.toml``;
* ``migrated-incoming@NAME.service`` receives NAME on the address in
  ``/run/migrated/incoming/NAME.env`` (``MIGRATED_LISTEN=HOST:PORT``) and keeps
  running it.

So a daemon restart (or crash) never touches a VM or a migration in progress; the
daemon finds its VMs again through their control sockets.  Both units are
``Type=notify``: ``systemctl start`` returns once the VM runs, or once the incoming
port listens.  We call ``systemctl`` rather than speak D-Bus: it is always there
with systemd, needs no Python binding, and its errors are readable.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from migrated.errors import MigratedError

from .hostconfig import HostConfig

__all__ = ["SupervisorError", "Systemd", "UnitState"]

log = logging.getLogger(__name__)


class SupervisorError(MigratedError):
    """systemctl failed; the message carries its output."""


@dataclass(frozen=True)
class UnitState:
    unit: str
    active: str  # active, activating, inactive, failed, ...
    sub: str
    status: str  # the unit's STATUS= text
    main_pid: int
    exit_status: int


class Systemd:
    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.systemctl = config.daemon.systemctl

    @staticmethod
    def vm_unit(name: str) -> str:
        return f"migrated-vm@{name}.service"

    @staticmethod
    def incoming_unit(name: str) -> str:
        return f"migrated-incoming@{name}.service"

    async def _run(self, *args: str, check: bool = True, timeout_s: float = 120) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.systemctl,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SupervisorError(f"systemctl {' '.join(args)} took over {timeout_s:g} s") from None
        text = out.decode(errors="replace").strip()
        if check and proc.returncode != 0:
            raise SupervisorError(
                f"systemctl {' '.join(args)} failed ({proc.returncode}): {text}",
                hint="see `journalctl -u " + (args[-1] if args else "migrated") + "`",
            )
        return text

    async def state(self, unit: str) -> UnitState:
        text = await self._run(
            "show",
            "-p",
            "ActiveState,SubState,StatusText,MainPID,ExecMainStatus",
            unit,
            check=False,
        )
        props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        return UnitState(
            unit,
            props.get("ActiveState", "unknown"),
            props.get("SubState", ""),
            props.get("StatusText", ""),
            int(props.get("MainPID", "0") or 0),
            int(props.get("ExecMainStatus", "0") or 0),
        )

    async def start_vm(self, name: str) -> None:
        unit = self.vm_unit(name)
        await self._run("reset-failed", unit, check=False)
        await self._run("start", unit)

    async def stop_unit(self, unit: str) -> None:
        await self._run("stop", "--no-block", unit)

    async def start_incoming(self, name: str, address: str, port: int) -> None:
        """Start the receiving VM process for ``name`` on ``address:port`` and wait
        until it listens (its READY=1)."""
        unit = self.incoming_unit(name)
        # The previous incoming process of this name may still be on its way out
        # (it leaves right after migrating away): wait until it is gone.
        for _ in range(100):
            st = await self.state(unit)
            if st.active in ("inactive", "failed", "unknown"):
                break
            await asyncio.sleep(0.1)
        else:
            raise SupervisorError(f"{unit} is still {st.active}: VM {name} runs here already")
        envdir = os.path.join(self.config.daemon.runtime_dir, "incoming")
        os.makedirs(envdir, mode=0o700, exist_ok=True)
        host = f"[{address}]" if ":" in address else address
        with open(os.path.join(envdir, f"{name}.env"), "w") as f:
            f.write(f"MIGRATED_LISTEN={host}:{port}\n")
        await self._run("reset-failed", unit, check=False)
        await self._run("start", unit)
        log.info("started %s listening on %s:%d", unit, address, port,
                 extra={"migrated_vm": name})  # fmt: skip
