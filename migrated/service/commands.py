"""The control commands of a VM process (``migrated status|migrate|cancel|...``).

Each handler answers from what the engines know, never from what the exit path
assumes: every result and error says where the VM is.  "Not valid in this state" is a
:class:`StateError` (exit 5), usage mistakes a :class:`ConfigError` (exit 2).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from migrated.engine import Mode, SendOptions
from migrated.errors import ConfigError, StateError
from migrated.protocol.state import MigrationState
from migrated.transport.net import parse_address as _parse
from migrated.vmm import Machine, Runstate

from .control import Emit, Handler

if TYPE_CHECKING:
    from .vmhost import VmHost

__all__ = ["handlers", "location", "machine_status", "parse_address", "send_options"]

S = MigrationState
Request = dict[str, Any]


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


def handlers(host: VmHost) -> dict[str, Handler]:
    def bind(fn: Any) -> Handler:
        async def handler(req: Request, emit: Emit) -> dict[str, Any]:
            return dict(await fn(host, req, emit))

        return handler

    return {
        name: bind(fn)
        for name, fn in (
            ("status", status),
            ("verify", verify),
            ("migrate", migrate),
            ("postcopy", postcopy),
            ("cancel", cancel),
            ("recover", recover),
            ("stop", stop),
            ("cont", cont),
        )
    }


def location(host: VmHost) -> str:
    """Where the VM is, in one sentence, from what this process knows."""
    out, dst = host.outgoing, host.destination
    if out is not None:
        eng = out.engine
        state = eng.state
        if state is S.COMPLETED:
            return f"the VM has migrated to {eng.host}:{eng.port}"
        if out.committed:
            return (
                f"the VM runs on the destination {eng.host}:{eng.port}; this source holds the "
                f"pages it has not received yet (postcopy {state.value})"
            )
        if out.running:
            return f"the VM runs here; migrating to {eng.host}:{eng.port} ({state.value})"
    if dst is not None and dst.session is not None:
        state = dst.state
        if state is S.READY:
            return (
                "this destination holds the complete VM state, not running, waiting for the source"
            )
        if dst.session.point_of_no_return and state is not S.FAILED:
            return (
                f"the VM runs here (postcopy {state.value})"
                if state is not S.COMPLETED
                else "the VM runs here"
            )
    m = host.machine
    if m is None:
        return "this process hosts no VM"
    return f"the VM is {m.runstate.value} here"


async def status(host: VmHost, req: Request, emit: Emit) -> dict[str, Any]:
    dst = host.destination
    return {
        "vm": machine_status(host.machine),
        "migration": host.migration_status(),
        "location": location(host),
        "port": dst.port if dst is not None else None,
    }


async def verify(host: VmHost, req: Request, emit: Emit) -> dict[str, Any]:
    m = host.require_machine()
    if m.runstate is not Runstate.RUNNING:
        raise StateError(
            f"the VM is {m.runstate.value}, so its guest cannot verify its memory now; "
            + location(host),
            hint="verify it where it runs (`migrated status` says where)",
        )
    timeout_s = float(req.get("timeout_s", 60))
    reports = await asyncio.to_thread(m.verify, timeout_s)
    return {"ok": all(r.ok for r in reports), "reports": [r.text for r in reports]}


async def migrate(host: VmHost, req: Request, emit: Emit) -> dict[str, Any]:
    opts = send_options(req)
    out = host.outgoing
    if out is not None and out.running:
        if out.engine.state not in (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER):
            raise StateError(
                f"a migration of this VM is already running ({out.engine.state.value})",
                hint="watch it with `migrated status`, or cancel it with `migrated cancel`",
            )
        # The same `send` again on a paused migration resumes it.
        target = _target(req, required=False)
        out.engine.recover_now(*(target or (None, None)))
        emit({"event": "resuming", "status": out.engine.state.value})
    else:
        m = host.require_machine()
        if m.runstate is not Runstate.RUNNING:
            raise StateError(f"the VM is {m.runstate.value}, not running; nothing to migrate")
        target = _target(req, required=True)
        assert target is not None
        out = host.start_migration(m, target[0], target[1], opts)
    stats = await out.follow(emit, wait_paused_s=opts.recovery_timeout_s)
    return {"status": "completed", "stats": stats.to_dict(), "exit_code": 0}


def _target(req: Request, *, required: bool) -> tuple[str, int] | None:
    text = req.get("to")
    if not text:
        if required:
            raise ConfigError("--to HOST:PORT is required")
        return None
    return parse_address(str(text))


async def postcopy(host: VmHost, req: Request, emit: Emit) -> dict[str, Any]:
    out = host.outgoing
    if out is None or not out.running:
        raise StateError("no outgoing migration is running")
    out.engine.request_switchover()
    return {"ok": True}


async def cancel(host: VmHost, req: Request, emit: Emit) -> dict[str, Any]:
    dst = host.destination
    if dst is not None and dst.session is not None and dst.state is S.READY:
        if not req.get("force"):
            raise StateError(
                "this destination holds the VM state in doubt: the source may have committed it",
                hint="check the source with `migrated status`; only if the VM runs there, drop "
                "the state here with `migrated cancel --force`",
            )
        dst.abandon("`migrated cancel --force` on the destination")
        return {"ok": True, "location": location(host)}
    out = host.outgoing
    if out is None or not out.running:
        raise StateError("no outgoing migration is running here")
    if not out.engine.cancel():
        raise StateError(
            f"cannot cancel in state {out.engine.state.value}: the VM was committed to the "
            "destination; postcopy is not cancellable",
            hint="let it complete, or recover it with `migrated recover`",
        )
    return {"ok": True}


async def recover(host: VmHost, req: Request, emit: Emit) -> dict[str, Any]:
    out = host.outgoing
    if out is None or not out.running or not out.committed:
        raise StateError("no paused outgoing migration to recover here")
    target = _target(req, required=False)
    out.engine.recover_now(*(target or (None, None)))
    return {"ok": True, "status": out.engine.state.value}


async def stop(host: VmHost, req: Request, emit: Emit) -> dict[str, Any]:
    reason = host.split_reason()
    if reason is not None and not req.get("force"):
        raise StateError(
            f"refusing to stop: {reason}",
            hint="wait for completion or recover the migration; `--force` stops anyway and "
            "can lose the VM",
        )
    out = host.outgoing
    if out is not None and out.running and not out.committed:
        out.engine.cancel("the VM is being stopped by the operator")
        assert out.task is not None
        await asyncio.wait([out.task])
    asyncio.get_running_loop().call_soon(host.finish, 0, "stopped by the operator")
    return {"ok": True}


async def cont(host: VmHost, req: Request, emit: Emit) -> dict[str, Any]:
    m = host.require_machine()
    out = host.outgoing
    if out is not None and out.running and out.committed:
        if not req.get("force"):
            raise StateError(
                "the VM was committed to the destination: it must not run here while the "
                "destination may run it",
                hint="only when the destination is known dead: `migrated cont --force` "
                "resumes the VM here from its state at the switchover",
            )
        if not out.engine.abandon("`migrated cont --force` on the source"):
            raise StateError(
                f"postcopy is {out.engine.state.value}, not paused: the destination runs the VM"
            )
        assert out.task is not None
        await asyncio.wait([out.task])
    elif m.runstate is Runstate.PAUSED:
        await asyncio.to_thread(m.resume)
    return {"runstate": m.runstate.value, "location": location(host)}


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[addr]:port``).  Raises ConfigError naming the text."""
    try:
        return _parse(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def send_options(req: Request) -> SendOptions:
    try:
        mode = Mode(req.get("mode") or "hybrid")
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
            try:
                kw[key] = conv(req[key])
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: expected a number, got {req[key]!r}") from None
    for key in ("precopy_bandwidth", "postcopy_bandwidth"):
        if kw.get(key, 0) < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must not be negative")
    if kw.get("max_precopy_rounds", 1) < 1:
        raise ConfigError("--max-precopy-rounds must be at least 1")
    if kw.get("recovery_timeout_s", 1) < 0:
        raise ConfigError("--recovery-timeout must not be negative")
    if not 1 <= kw.get("frame_pages", 256) <= 1024:
        raise ConfigError("frame_pages must be 1..1024")
    return SendOptions(**kw)
