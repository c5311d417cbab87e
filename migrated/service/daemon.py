"""``migrated daemon``: the per-host control plane (libvirt's peer-to-peer model).

One daemon per host.  It owns three doors:

* the local control socket (:mod:`.localctl`): ``list``, ``status``, ``start``,
  ``migrate`` for operators on this host (root or ``daemon.control_group``);
* the daemon port (``daemon.listen``, default 7440), mutual TLS 1.3 with default-deny
  authorization (:mod:`.tls`): other daemons ask it to ``prepare-incoming`` a VM;
* optionally the metrics endpoint (:mod:`.metrics`).

It runs no VM itself.  Each VM is its own systemd unit (:mod:`.supervisor`), so
restarting the daemon never touches a VM or a migration in progress; the daemon
finds them again through their control sockets (``/run/migrated/vm/*/control.sock``)
and polls them every second for ``list``, ``STATUS=`` and the metrics.

A migration of VM ``web1`` from host A to host B (``migrated migrate web1 --to B``):

1. A's daemon checks that web1 runs here, connects to B's daemon (mTLS, each side
   authorizes the other's certificate) and sends ``prepare-incoming web1``;
2. B's daemon picks a free port of ``daemon.incoming_ports``, starts
   ``migrated-incoming@web1`` listening there and waits for its ``READY=1``, then
   answers with the port;
3. A's daemon sends ``migrate`` with ``to = B:PORT`` to web1's control socket and
   relays the progress to the operator.  The VM process does the migration; its
   exit codes and the ownership record (:mod:`.ownership`) say where the VM is.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
import signal
import socket
import time
from typing import Any

from migrated.errors import ConfigError, MigratedError

from . import control
from .hostconfig import DEFAULT_PORT, HostConfig, split_address
from .lines import Caller, Emit, LineHandler, exchange, serve_lines
from .localctl import LocalControl
from .metrics import FINISHED, MetricsState, start_metrics_server
from .notify import Notifier
from .supervisor import Systemd
from .tls import build_security, peer_identities
from .vmunit import describe

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SEND_KEYS = ("mode", "max_precopy_rounds", "checksum", "recovery_timeout_s", "bulk_channel",
             "precopy_bandwidth", "postcopy_bandwidth")  # fmt: skip
POLL_INTERVAL_S = 1.0


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"bad VM name {name!r}: 1-64 of letters, digits, '-', '_', '.'")
    return name


class Daemon:
    def __init__(
        self, config: HostConfig, *, notifier: Notifier | None = None, units: Any = None
    ) -> None:
        self.config = config
        self.security = build_security(config.tls)
        self.notifier = notifier or Notifier.from_environment()
        self.units = units or Systemd(config)
        self.metrics = MetricsState()
        self.views: dict[str, dict[str, Any]] = {}
        self.outgoing: dict[str, dict[str, Any]] = {}  # driven by this daemon
        self._seen_status: dict[str, str] = {}
        self._incoming_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.peer_port = 0
        self.hostname = socket.gethostname()

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> int:
        d = self.config.daemon
        if not self.security.tls:
            log.warning("tls.mode is \"plain\": migrations and the daemon port are neither "
                        "encrypted nor authenticated; anyone who reaches port %d can push a "
                        "VM into this host", d.listen[1])  # fmt: skip
        elif not self.config.tls.allowed_peers:
            log.warning("tls.allowed_peers is empty: every peer daemon will be refused")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        local = LocalControl(d.control_socket, d.control_group, self._local_handlers())
        await local.start()
        from migrated.transport import tls_check

        peer = await tls_check.serve_streams(
            self._peer_connection, d.listen[0], d.listen[1], self.security
        )
        self.peer_port = peer.sockets[0].getsockname()[1]
        metrics = None
        if self.config.metrics_listen:
            metrics = start_metrics_server(self.metrics, self.config.metrics_listen)
            log.info("metrics on http://%s:%d/metrics", *self.config.metrics_listen)
        try:
            await self._poll_once()
            log.info("control socket %s and daemon port %s:%d (%s) are up", d.control_socket,
                     d.listen[0], self.peer_port,
                     "mutual TLS" if self.security.tls else "PLAIN TCP")  # fmt: skip
            self.notifier.ready(self.summary())
            async with asyncio.TaskGroup() as tg:
                poller = tg.create_task(self._poll_loop())
                dog = tg.create_task(self.notifier.watchdog_loop())
                await self._stop.wait()
                poller.cancel()
                dog.cancel()
        finally:
            self.notifier.stopping("stopping; VMs keep running")
            peer.close()
            await local.close()
            if metrics is not None:
                metrics.shutdown()
        log.info("daemon stopped; VM processes are untouched")
        return 0

    def stop(self) -> None:
        self._stop.set()

    # -- knowing the host's VMs ------------------------------------------------------------

    def control_sockets(self) -> dict[str, str]:
        pattern = os.path.join(self.config.daemon.runtime_dir, "vm", "*", "control.sock")
        return {os.path.basename(os.path.dirname(p)): p for p in glob.glob(pattern)}

    async def _poll_once(self) -> None:
        socks = self.control_sockets()

        async def one(name: str, path: str) -> tuple[str, dict[str, Any] | None]:
            try:
                return name, await asyncio.wait_for(control.request(path, "status"), 2.0)
            except (MigratedError, OSError, TimeoutError, ValueError):
                return name, None

        results = await asyncio.gather(*(one(n, p) for n, p in socks.items()))
        views = {name: view for name, view in results if view is not None}
        for name, view in views.items():
            mig = view.get("migration") or {}
            status, role = mig.get("status"), mig.get("role", "")
            if (
                role == "destination"
                and status in FINISHED
                and self._seen_status.get(name)
                not in (
                    None,
                    *FINISHED,
                )
            ):
                self.metrics.record_result(name, role, status, mig)
            if status:
                self._seen_status[name] = status
        self.views = views
        self.metrics.views = views
        self.notifier.status(self.summary())

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            await self._poll_once()

    def summary(self) -> str:
        moving = []
        for name, view in sorted(self.views.items()):
            mig = view.get("migration") or {}
            if mig.get("status") and mig["status"] not in FINISHED:
                prog = self.metrics.progress.get(name)
                if prog:
                    mig = {**mig, **{k: v for k, v in prog.items() if k != "status"}}
                moving.append(f"{name} {describe({'vm': view.get('vm'), 'migration': mig})}")
        text = f"{len(self.views)} VM{'s' if len(self.views) != 1 else ''}"
        if moving:
            text += f", {len(moving)} migrating: " + "; ".join(moving)
        return text

    # -- the local control socket ------------------------------------------------------------

    def _local_handlers(self) -> dict[str, Any]:
        return {
            "list": self._cmd_list,
            "status": self._cmd_status,
            "start": self._cmd_start,
            "migrate": self._cmd_migrate,
        }

    async def _cmd_list(self, req: dict[str, Any], emit: Emit, caller: Caller) -> dict[str, Any]:
        await self._poll_once()
        vms = []
        configured = {
            os.path.basename(p)[: -len(".toml")]
            for p in glob.glob(os.path.join(self.config.daemon.vm_dir, "*.toml"))
        }
        from .ownership import Ownership

        for name in sorted(configured | set(self.views)):
            view = self.views.get(name)
            rec = Ownership(self.config.state_path(name)).read()
            vm = (view or {}).get("vm") or {}
            mig = (view or {}).get("migration") or {}
            vms.append({
                "name": name,
                "runstate": vm.get("runstate", "not running"),
                "memory_bytes": vm.get("memory_bytes"),
                "migration": {k: mig.get(k) for k in ("role", "status", "transferred_bytes",
                                                      "downtime_s", "total_s")} if mig else None,
                "ownership": {"state": rec.state, "peer": rec.peer} if rec else None,
                "configured": name in configured,
            })  # fmt: skip
        return {"host": self.hostname, "vms": vms, "summary": self.summary()}

    async def _cmd_status(self, req: dict[str, Any], emit: Emit, caller: Caller) -> dict[str, Any]:
        name = check_name(req.get("name"))
        return await control.request(self.config.control_path(name), "status")

    async def _cmd_start(self, req: dict[str, Any], emit: Emit, caller: Caller) -> dict[str, Any]:
        name = check_name(req.get("name"))
        from .ownership import Ownership

        Ownership(self.config.state_path(name)).check_boot(name)
        await self.units.start_vm(name)
        await self._poll_once()
        return {"started": self.units.vm_unit(name)}

    async def _cmd_migrate(self, req: dict[str, Any], emit: Emit, caller: Caller) -> dict[str, Any]:
        name = check_name(req.get("name"))
        peer_host, peer_port = split_address(str(req.get("to", "")), "--to", DEFAULT_PORT)
        path = self.config.control_path(name)
        view = await control.request(path, "status")  # raises when nothing runs here
        if (view.get("vm") or {}).get("runstate") != "running":
            raise ConfigError(f"VM {name} is {(view.get('vm') or {}).get('runstate')}, not running")
        if name in self.outgoing:
            raise ConfigError(f"VM {name} is already migrating to {self.outgoing[name]['to']}")
        log.info("%s asks to migrate %s to %s:%d", caller.identity, name, peer_host, peer_port,
                 extra={"migrated_vm": name})  # fmt: skip
        answer = await self.peer_request(
            peer_host, peer_port, "prepare-incoming", name=name,
            memory_bytes=(view.get("vm") or {}).get("memory_bytes"),
        )  # fmt: skip
        vm_host = str(answer.get("host") or peer_host)
        to = f"[{vm_host}]:{answer['port']}" if ":" in vm_host else f"{vm_host}:{answer['port']}"
        emit({"event": "destination-ready", "to": to, "peer": answer.get("hostname")})
        params = {k: req[k] for k in SEND_KEYS if req.get(k) is not None}
        self.outgoing[name] = {"to": to, "since": time.time()}
        phase = {"status": "setup"}
        result: dict[str, Any] = {}
        try:
            async for msg in control.stream(path, "migrate", to=to, **params):
                if "result" in msg:
                    result = msg["result"]
                    break
                self._watch_event(name, msg, phase)
                emit(msg)
        except control.ControlError as exc:
            self._event(name, "failed", f"migration of {name} to {to} failed: {exc}",
                        phase["status"], logging.WARNING)  # fmt: skip
            self.metrics.record_result(name, "source", "failed", {})
            if exc.exit_code == 1:  # before the commit: the destination holds nothing
                with contextlib.suppress(MigratedError, OSError):
                    await self.peer_request(peer_host, peer_port, "abort-incoming", name=name)
            raise
        finally:
            self.outgoing.pop(name, None)
        stats = result.get("stats") or {}
        self.metrics.record_result(name, "source", "completed", stats)
        self._event(name, "completed", f"VM {name} migrated to {to} in "
                    f"{stats.get('total_s', 0):.3f} s, downtime "
                    f"{stats.get('downtime_s', 0) * 1e3:.1f} ms", "completed")  # fmt: skip
        return result

    def _watch_event(self, name: str, msg: dict[str, Any], phase: dict[str, str]) -> None:
        kind = msg.get("event")
        if kind == "progress":
            self.metrics.progress[name] = msg
        elif kind == "state":
            status = str(msg.get("status"))
            if status != phase["status"]:
                phase["status"] = status
                if status == "switchover":
                    self._event(name, "switchover", f"VM {name}: switchover", status)
                elif status == "postcopy-paused":
                    self._event(name, "postcopy-paused", f"VM {name}: postcopy paused; the "
                                "source keeps retrying", status, logging.WARNING)  # fmt: skip
        elif kind == "recovered":
            self._event(name, "recovered", f"VM {name}: postcopy recovered", phase["status"])

    @staticmethod
    def _event(name: str, event: str, text: str, phase: str, level: int = logging.INFO) -> None:
        log.log(level, text, extra={"migrated_vm": name, "migrated_phase": phase,
                                    "migrated_event": event})  # fmt: skip

    # -- the daemon port ---------------------------------------------------------------------

    async def peer_request(self, host: str, port: int, cmd: str, **args: Any) -> dict[str, Any]:
        from migrated.transport import tls_check

        try:
            reader, writer = await asyncio.wait_for(
                tls_check.open_stream(host, port, self.security), 15
            )
        except (OSError, TimeoutError) as exc:
            raise MigratedError(
                f"cannot reach the migrated daemon at {host}:{port}: {exc}",
                hint="is `migrated.service` running there, and port open in its firewall? "
                "With TLS: is its certificate signed by our CA and listed in our "
                "tls.allowed_peers, and ours in its?",
            ) from exc
        try:
            async for msg in exchange(reader, writer, cmd, **args):
                if "result" in msg:
                    return dict(msg["result"])
        except (OSError, EOFError) as exc:  # e.g. an ssl alert: it refused our certificate
            raise MigratedError(
                f"the daemon at {host}:{port} closed the connection ({exc})",
                hint="it probably refused our certificate: see its journal",
            ) from exc
        raise MigratedError(f"no answer to {cmd} from {host}:{port}")

    async def _peer_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        cert = writer.get_extra_info("peercert")
        if cert:
            identity = ",".join(peer_identities(cert))
        else:
            addr = writer.get_extra_info("peername")
            identity = f"{addr[0]} (plain TCP)" if addr else "?"
        handlers: dict[str, LineHandler] = {
            "hello": self._peer_hello,
            "prepare-incoming": self._peer_prepare,
            "abort-incoming": self._peer_abort,
            "vm-status": self._peer_vm_status,
        }
        await serve_lines(reader, writer, handlers, Caller("peer", identity))

    async def _peer_hello(self, req: dict[str, Any], emit: Emit, caller: Caller) -> dict[str, Any]:
        return {"hostname": self.hostname, "you": caller.identity}

    async def _peer_prepare(
        self, req: dict[str, Any], emit: Emit, caller: Caller
    ) -> dict[str, Any]:
        name = check_name(req.get("name"))
        async with self._incoming_lock:
            path = self.config.control_path(name)
            with contextlib.suppress(MigratedError, OSError):
                view = await asyncio.wait_for(control.request(path, "status"), 2)
                if (view.get("vm") or {}).get("runstate") not in (None, "none"):
                    raise ConfigError(f"VM {name} already runs on {self.hostname}")
            port = self._free_port()
            await self.units.start_incoming(name, self.config.daemon.incoming_address, port)
        log.info("prepared incoming VM %s from %s on port %d", name, caller.identity, port,
                 extra={"migrated_vm": name})  # fmt: skip
        return {"port": port, "hostname": self.hostname}

    def _free_port(self) -> int:
        lo, hi = self.config.daemon.incoming_ports
        addr = self.config.daemon.incoming_address
        for port in range(lo, hi + 1):
            with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
                try:
                    s.bind((addr, port))
                except OSError:
                    continue
                return port
        raise MigratedError(f"no free port in daemon.incoming_ports {lo}-{hi}")

    async def _peer_abort(self, req: dict[str, Any], emit: Emit, caller: Caller) -> dict[str, Any]:
        name = check_name(req.get("name"))
        # A receiver that runs the guest ignores SIGTERM while split: stopping is safe.
        await self.units.stop_unit(self.units.incoming_unit(name))
        return {"stopped": True}

    async def _peer_vm_status(
        self, req: dict[str, Any], emit: Emit, caller: Caller
    ) -> dict[str, Any]:
        name = check_name(req.get("name"))
        view = self.views.get(name)
        return {"name": name, "here": view is not None, "status": view}
