"""``migrated``: the command line.  Exit codes: see :data:`EXIT_CODES` (and the README)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import faulthandler
import json
import logging
import signal
import sys
from typing import Any

from migrated.errors import ConfigError, ControlError, MigratedError, VmStateUnknown
from migrated.ui import Printer

EXIT_CODES = """exit codes:
  0  completed
  1  failed before the commit: the VM runs on the source, unchanged
  2  usage or configuration error: nothing was changed
  3  postcopy paused: the VM runs on the destination, do NOT restart the source; the
     source keeps reconnecting: `migrated recover` (or the same `send` again) resumes
  4  the VM process went away: check both hosts with `migrated status` first
  5  not valid in the current state: nothing was changed (the message says why)"""


def _loop_policy() -> None:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # An operator's (or a test's) window into a process that seems stuck:
    # `kill -USR2 PID` writes every thread's Python stack to stderr (the journal for
    # units) and the process carries on.
    faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)  # USR1 kicks vCPUs


# -- commands hosting a VM --------------------------------------------------------------


def _configure_logging(level: int) -> None:
    """Log records to stderr with the migration context (service processes)."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="migrated[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from migrated.service.preflight import check_host
    from migrated.service.vmhost import VmHost
    from migrated.transport.faults import from_environment
    from migrated.vmm import load_config
    from migrated.vmm.admission import admit

    config = load_config(args.config)
    if args.console:
        config = dataclasses.replace(config, console=args.console)
    check_host(need_uffd=False)
    admit(config.memory_bytes, what=f"VM {config.name!r}")
    _configure_logging(logging.INFO)
    host = VmHost(args.control, printer=Printer(args.json), fault=from_environment())
    _loop_policy()
    return asyncio.run(host.serve(lambda: host.boot(config)))


def cmd_recv(args: argparse.Namespace) -> int:
    from migrated.engine import RecvOptions
    from migrated.service.commands import parse_address
    from migrated.service.preflight import check_host
    from migrated.service.vmhost import VmHost
    from migrated.transport.faults import from_environment

    listen_host, port = parse_address(args.listen)
    check_host(need_uffd=True)
    _configure_logging(logging.INFO)
    host = VmHost(args.control, printer=Printer(args.json), fault=from_environment())
    opts = RecvOptions(console=args.console)
    _loop_policy()
    return asyncio.run(host.serve(lambda: host.receive(listen_host, port, opts)))


# -- commands talking to a VM process ---------------------------------------------------


def cmd_send(args: argparse.Namespace) -> int:
    from migrated.service.control import stream

    printer = Printer(args.json)
    params = {
        "to": args.to,
        "mode": args.mode,
        "max_precopy_rounds": args.max_precopy_rounds,
        "checksum": args.checksum,
        "recovery_timeout_s": args.recovery_timeout,
        "bulk_channel": False if args.no_bulk_channel else None,
        "precopy_bandwidth": _mbps(args.precopy_bandwidth),
        "postcopy_bandwidth": _mbps(args.postcopy_bandwidth),
    }

    last_state = ""

    async def go() -> dict[str, Any]:
        nonlocal last_state
        result: dict[str, Any] = {}
        try:
            async for msg in stream(args.control, "migrate", **params):
                if "result" in msg:
                    result = msg["result"]
                else:
                    if msg.get("event") == "state":
                        last_state = str(msg.get("status", ""))
                    printer(msg)
        except ControlError as exc:
            if exc.exit_code != VmStateUnknown.exit_code:
                raise
            phase = f"in phase {last_state!r}" if last_state else "before it reported a phase"
            raise VmStateUnknown(
                f"the source VM process went away during the migration {phase}: {exc}",
                hint=f"check both hosts with `migrated status` before anything else; "
                f"the destination is {args.to}",
            ) from exc
        return result

    _loop_policy()
    result = asyncio.run(go())
    if args.json:
        print(json.dumps({"event": "result", **result}), flush=True)
    else:
        s = result.get("stats", {})
        print(
            f"migrated: completed in {s.get('total_s', 0):.3f} s, downtime "
            f"{s.get('downtime_s', 0) * 1e3:.1f} ms, {s.get('transferred_bytes', 0) / 2**20:.0f}"
            f" MiB moved, {s.get('postcopy_requests', 0)} page requests served",
            file=sys.stderr,
        )
    return int(result.get("exit_code", 0))


def _mbps(value: float | None) -> int | None:
    """MB/s on the command line, bytes/s on the wire."""
    return None if value is None else int(value * 1e6)


def _simple(cmd: str, **extra: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        from migrated.service.control import request

        params = {k: getattr(args, k) for k in extra}
        result = asyncio.run(request(args.control, cmd, **params))
        if getattr(args, "json", False):
            print(json.dumps(result))
        else:
            _print_human(cmd, result)
        if cmd == "verify" and not result.get("ok"):
            return 1
        return 0

    return run


def _print_human(cmd: str, result: dict[str, Any]) -> None:
    if cmd == "status":
        vm = result.get("vm", {})
        print(
            f"VM {vm.get('name', '-')}: {vm.get('runstate')}, "
            f"{vm.get('memory_bytes', 0) / 2**20:.0f} MiB"
        )
        for v in vm.get("vcpus", []):
            print(
                f"  vCPU {v['index']}: {v['runstate']}; last report: {v['last_report']}"
                + (f"; {v['writes']} writes" if v.get("writes") is not None else "")
            )
            if v.get("crash"):
                print("    " + v["crash"].replace("\n", "\n    "))
        mig = result.get("migration")
        if mig:
            print(
                f"migration ({mig.get('role')}): {mig.get('status')}, "
                f"{mig.get('transferred_bytes', 0) / 2**20:.0f} MiB moved, "
                f"{mig.get('postcopy_requests', 0)} page requests"
            )
    elif cmd == "verify":
        for line in result.get("reports", []):
            print(line)
    else:
        print(json.dumps(result))


def cmd_demo(args: argparse.Namespace) -> int:
    from migrated.demo import run_demo

    return run_demo(memory_mib=args.memory_mib, vcpus=args.vcpus, mode=args.mode, as_json=args.json)


# -- the host service (daemon, VM units, install) ------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    from migrated.service.daemon import Daemon
    from migrated.service.hostconfig import load_host_config
    from migrated.service.journal import setup_logging

    config = load_host_config(args.config)
    setup_logging(config.daemon.log_level)
    daemon = Daemon(config)
    _loop_policy()
    return asyncio.run(daemon.run())


def cmd_vm(args: argparse.Namespace) -> int:
    import os

    from migrated.engine import RecvOptions
    from migrated.service.commands import parse_address
    from migrated.service.hostconfig import HostConfig, load_host_config
    from migrated.service.journal import setup_logging
    from migrated.service.notify import Notifier
    from migrated.service.preflight import check_host
    from migrated.service.vmunit import UnitVmHost, serve_unit
    from migrated.vmm import load_config

    config = load_host_config(args.config) if os.path.exists(args.config) else HostConfig()
    setup_logging(config.daemon.log_level)
    host = UnitVmHost(args.name, config, Notifier.from_environment())
    if args.incoming:
        listen_host, port = parse_address(args.incoming)
        check_host(need_uffd=True)
        opts = RecvOptions(console="none")
        start: Any = lambda: host.receive(listen_host, port, opts)  # noqa: E731
    else:
        host.ownership.check_boot(args.name)
        vm = load_config(config.vm_config_path(args.name))
        if vm.name != args.name:
            raise ConfigError(
                f"{config.vm_config_path(args.name)}: name is {vm.name!r}, "
                f"but the unit is for {args.name!r}"
            )
        check_host(need_uffd=False)
        start = lambda: host.boot(vm)  # noqa: E731
    _loop_policy()
    return asyncio.run(serve_unit(host, start))


def _daemon_stream(args: argparse.Namespace, cmd: str, **params: Any) -> Any:
    from migrated.service.control import stream

    return stream(args.socket, cmd, **params)


def cmd_list(args: argparse.Namespace) -> int:
    from migrated.service.control import request

    result = asyncio.run(request(args.socket, "list"))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"host {result.get('host')}: {result.get('summary')}")
    print(f"{'NAME':<16} {'STATE':<12} {'MEMORY':>8}  MIGRATION")
    for vm in result.get("vms", []):
        mig = vm.get("migration") or {}
        own = vm.get("ownership") or {}
        note = f"{mig.get('role')} {mig.get('status')}" if mig else ""
        if own.get("state") in ("away", "outgoing") and vm.get("runstate") == "not running":
            note = f"{own['state']} -> {own.get('peer')}"
        mem = f"{(vm.get('memory_bytes') or 0) / 2**20:.0f} MiB" if vm.get("memory_bytes") else "-"
        print(f"{vm['name']:<16} {vm.get('runstate', '-'):<12} {mem:>8}  {note}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    printer = Printer(args.json)
    params = {
        "name": args.name,
        "to": args.to,
        "mode": args.mode,
        "max_precopy_rounds": args.max_precopy_rounds,
        "precopy_bandwidth": _mbps(args.precopy_bandwidth),
        "postcopy_bandwidth": _mbps(args.postcopy_bandwidth),
    }

    async def go() -> dict[str, Any]:
        result: dict[str, Any] = {}
        async for msg in _daemon_stream(args, "migrate", **params):
            if "result" in msg:
                result = msg["result"]
            else:
                printer(msg)
        return result

    _loop_policy()
    result = asyncio.run(go())
    s = result.get("stats", {})
    if args.json:
        print(json.dumps({"event": "result", **result}), flush=True)
    else:
        print(
            f"migrated: {args.name} migrated to {args.to} in {s.get('total_s', 0):.3f} s, "
            f"downtime {s.get('downtime_s', 0) * 1e3:.1f} ms",
            file=sys.stderr,
        )
    return int(result.get("exit_code", 0))


def cmd_install_units(args: argparse.Namespace) -> int:
    from migrated.service.install import install_units

    for path in install_units(args.root, args.bin, reload=not args.no_reload):
        print(path)
    return 0


def _add_service_commands(sub: Any) -> None:
    default_socket = "/run/migrated/migrated.sock"
    default_config = "/etc/migrated/migrated.toml"
    dm = sub.add_parser("daemon", help="the per-host daemon (run by migrated.service)")
    dm.add_argument("--config", default=default_config)
    dm.set_defaults(func=cmd_daemon)

    vm = sub.add_parser("vm", help="one VM process of a unit (run by migrated-vm@NAME)")
    vm.add_argument("name")
    vm.add_argument("--incoming", metavar="HOST:PORT", help="receive the VM on this address")
    vm.add_argument("--config", default=default_config)
    vm.set_defaults(func=cmd_vm)

    ls = sub.add_parser("list", help="the VMs and migrations of this host (via the daemon)")
    ls.add_argument("--socket", default=default_socket)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    mg = sub.add_parser("migrate", help="migrate VM NAME to another host (via both daemons)")
    mg.add_argument("name")
    mg.add_argument("--to", required=True, metavar="HOST[:PORT]", help="the other daemon")
    mg.add_argument("--socket", default=default_socket)
    mg.add_argument("--mode", choices=["postcopy", "hybrid", "precopy"], default="hybrid")
    mg.add_argument("--max-precopy-rounds", type=int, default=None)
    mg.add_argument("--precopy-bandwidth", type=float, metavar="MB/S")
    mg.add_argument("--postcopy-bandwidth", type=float, metavar="MB/S")
    mg.add_argument("--json", action="store_true")
    mg.set_defaults(func=cmd_migrate)

    iu = sub.add_parser("install-units", help="install the systemd units and /etc/migrated")
    iu.add_argument("--root", default="/", help="install below this directory (packaging)")
    iu.add_argument("--bin", help="the migrated executable the units run (default: this one)")
    iu.add_argument("--no-reload", action="store_true", help="do not run systemctl daemon-reload")
    iu.set_defaults(func=cmd_install_units)


# -- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="migrated",
        description="Postcopy live migration of KVM virtual machines.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="boot a VM from a TOML config and serve its control socket")
    r.add_argument("config")
    r.add_argument("--control", help="Unix control socket path")
    r.add_argument("--console", help="console destination: stdout, none or a file path")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_run)

    rv = sub.add_parser("recv", help="wait for an incoming VM, then keep running it")
    rv.add_argument("--listen", required=True, metavar="HOST:PORT")
    rv.add_argument("--control", help="Unix control socket path")
    rv.add_argument("--console", help="console destination for the arriving VM")
    rv.add_argument("--json", action="store_true")
    rv.set_defaults(func=cmd_recv)

    s = sub.add_parser("send", help="migrate the VM of a control socket to a destination")
    s.add_argument("--control", required=True)
    s.add_argument("--to", required=True, metavar="HOST:PORT")
    s.add_argument("--mode", choices=["postcopy", "hybrid", "precopy"], default="hybrid")
    s.add_argument("--max-precopy-rounds", type=int, default=None)
    s.add_argument("--checksum", action="store_true", help="xxh3 checksum on every page frame")
    s.add_argument(
        "--recovery-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to keep reconnecting after a link failure in postcopy",
    )
    s.add_argument(
        "--precopy-bandwidth",
        type=float,
        metavar="MB/S",
        help="cap precopy and switchover traffic (megabytes per second)",
    )
    s.add_argument(
        "--postcopy-bandwidth",
        type=float,
        metavar="MB/S",
        help="cap the postcopy background push (urgent pages are never capped)",
    )
    s.add_argument(
        "--no-bulk-channel",
        action="store_true",
        help="push postcopy pages on the main connection (for peers without BULK)",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_send)

    for name, helptext, extra in (
        ("status", "show the VM and migration state", {}),
        ("verify", "ask the guest to verify all its memory now", {}),
        ("postcopy", "switch a running hybrid migration to postcopy now", {}),
        (
            "cancel",
            "cancel a migration before the commit; --force on a destination holding the "
            "state in doubt drops it (only when the source runs the VM)",
            {"force": None},
        ),
        (
            "recover",
            "retry a paused postcopy migration now (optionally to a new address)",
            {"to": None},
        ),
        ("stop", "stop the VM and its process", {"force": None}),
        (
            "cont",
            "resume a VM paused on the source; --force: also after the commit, only when "
            "the destination is known dead",
            {"force": None},
        ),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--control", required=True)
        c.add_argument("--json", action="store_true")
        if "to" in extra:
            c.add_argument("--to", metavar="HOST:PORT")
        if "force" in extra:
            c.add_argument("--force", action="store_true")
        c.set_defaults(func=_simple(name, **extra))

    d = sub.add_parser("demo", help="migrate a memstress VM between two local processes")
    d.add_argument("--memory-mib", type=int, default=512)
    d.add_argument("--vcpus", type=int, default=2)
    d.add_argument("--mode", choices=["postcopy", "hybrid", "precopy"], default="hybrid")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)
    _add_service_commands(sub)  # the host service (daemon, VM units, install)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MigratedError as exc:
        print(f"migrated: error: {exc.describe()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"migrated: error: {exc}", file=sys.stderr)
        return 1


__all__ = ["ConfigError", "main"]
