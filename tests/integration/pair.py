"""Helpers for the paired-VM integration tests: real ``migrated`` processes.

Nothing here is mocked.  A :class:`Pair` starts ``migrated run`` (the source VM) and
``migrated recv`` (the destination) as separate processes, optionally each inside its
own network namespace (:class:`NetPair`), and drives them through the real command
line (``migrated send|status|verify|cancel|stop``).  Quick polling of ``status`` goes
straight to the control socket (the same JSON-lines protocol the CLI speaks) so that a
poll loop does not start a Python interpreter per iteration on this 2-core machine.

Every process writes its output to a log file in the pair's work directory; failure
messages include the tail of those logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrated.demo import CONFIG
from migrated.service.control import request

MIGRATED = [sys.executable, "-m", "migrated"]

#: A bare control-socket client (the JSON-lines protocol of migrated.service.control):
#: sends one request, copies every reply line to stdout, exits with the result's
#: exit_code (or the error's).  Used to watch a ``migrate`` stream without depending on
#: the ``migrated send`` client.
RAW_CLIENT = """\
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\\n")
f = s.makefile("rb")
code = 4
for line in f:
    sys.stdout.write(line.decode()); sys.stdout.flush()
    msg = json.loads(line)
    if "result" in msg:
        code = int(msg["result"].get("exit_code", 0)); break
    if isinstance(msg.get("error"), dict) and "event" not in msg:
        code = int(msg["error"].get("exit_code", 1)); break
sys.exit(code)
"""


def tail(path: Path, nbytes: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"({path} missing)"
    return data[-nbytes:].decode(errors="replace")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- network namespaces ------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")
    return r


@dataclass
class Netns:
    """Two namespaces joined by a veth pair: ``src_ns`` holds ``src_if`` (``src_ip``),
    ``dst_ns`` holds ``dst_if`` (``dst_ip``).  Names are unique per run."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}{secrets.token_hex(2)}")
    src_ip: str = "10.77.0.1"
    dst_ip: str = "10.77.0.2"

    def __post_init__(self) -> None:
        self.src_ns = f"migtest-{self.tag}-s"
        self.dst_ns = f"migtest-{self.tag}-d"
        self.src_if = f"mvs{self.tag}"[:15]
        self.dst_if = f"mvd{self.tag}"[:15]
        self.created: list[str] = []

    def create(self) -> None:
        for ns in (self.src_ns, self.dst_ns):
            _ip("netns", "add", ns)
            self.created.append(ns)
        _ip("link", "add", self.src_if, "netns", self.src_ns, "type", "veth",
            "peer", "name", self.dst_if, "netns", self.dst_ns)  # fmt: skip
        for ns, dev, addr in (
            (self.src_ns, self.src_if, self.src_ip),
            (self.dst_ns, self.dst_if, self.dst_ip),
        ):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def delete(self) -> None:
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)
        self.created.clear()

    def exec_prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.src_ns if side == "source" else self.dst_ns]

    def rate_limit(self, mbytes_per_s: float) -> None:
        """Token-bucket limit on the source's egress (the migration data direction).
        ``tbf`` is available here (netem is not)."""
        rate = f"{int(mbytes_per_s * 8)}mbit"
        _ip("netns", "exec", self.src_ns, "tc", "qdisc", "add", "dev", self.src_if, "root",
            "tbf", "rate", rate, "burst", "256kb", "latency", "100ms")  # fmt: skip

    def abort_connections(self, port: int) -> None:
        """Abort every TCP connection to/from ``port`` in both namespaces (``ss -K``): what
        each kernel does once it gives up on a dead link, without waiting minutes."""
        for ns in (self.src_ns, self.dst_ns):
            r = subprocess.run(
                ["ip", "netns", "exec", ns, "ss", "-K", "-t", "state", "established",
                 f"( sport = :{port} or dport = :{port} )"],
                capture_output=True, text=True,
            )  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(f"ss -K in {ns} failed: {r.stderr.strip()}")

    def tx_bytes(self, side: str) -> int:
        ns, dev = (self.src_ns, self.src_if) if side == "source" else (self.dst_ns, self.dst_if)
        r = _ip("-n", ns, "-j", "-s", "link", "show", "dev", dev)
        return int(json.loads(r.stdout)[0]["stats64"]["tx"]["bytes"])

    def link(self, up: bool) -> None:
        """Cut or restore the link: the destination's end of the veth goes down/up."""
        _ip("-n", self.dst_ns, "link", "set", self.dst_if, "up" if up else "down")


# -- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running after {timeout} s\n"
                f"--- {self.log.name} ---\n{tail(self.log)}"
            ) from None

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(30)

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.terminate()
        try:
            self.popen.wait(5)
            return
        except subprocess.TimeoutExpired:
            pass
        # SIGTERM is ignored on purpose while postcopy is split between two hosts.
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait(30)


@dataclass
class Guest:
    memory_mib: int = 256
    vcpus: int = 1
    hot_set_mib: int = 16
    writes_per_s: int = 20000
    fill_percent: int = 100
    seed: int = 1
    extra: str = ""  # more TOML lines (e.g. a bad key)

    def toml(self, name: str) -> str:
        return CONFIG.format(name=name, guest="memstress", **self.__dict__)


class Pair:
    """A source VM process and a destination receiver process.

    ``net`` None: both in this namespace, the destination listens on 127.0.0.1.
    With a :class:`Netns`: each in its namespace, the destination listens on
    ``net.dst_ip``.  Control sockets are Unix files in ``workdir``, reachable from here.
    """

    def __init__(self, workdir: Path, net: Netns | None = None) -> None:
        self.workdir = workdir
        self.net = net
        self.procs: list[Proc] = []
        self.source: Proc | None = None
        self.dest: Proc | None = None
        self.dest_port = 0

    # paths and addresses
    @property
    def src_sock(self) -> str:
        return str(self.workdir / "source.sock")

    @property
    def dst_sock(self) -> str:
        return str(self.workdir / "dest.sock")

    @property
    def dest_host(self) -> str:
        return self.net.dst_ip if self.net else "127.0.0.1"

    @property
    def dest_addr(self) -> str:
        return f"{self.dest_host}:{self.dest_port}"

    def _spawn(
        self,
        name: str,
        side: str,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
    ) -> Proc:
        """Start ``migrated ARGS`` on ``side`` (in its namespace).  ``env`` adds to the
        environment (e.g. MIGRATED_FAULT); ``wrap`` is a command prefix run first, in
        this namespace (e.g. one that joins a cgroup, then execs the rest)."""
        log = self.workdir / f"{name}.log"
        prefix = self.net.exec_prefix(side) if self.net else []
        with open(log, "ab") as f:
            popen = subprocess.Popen(
                [*(wrap or []), *prefix, *MIGRATED, *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env={**os.environ, **env} if env else None,
            )
        p = Proc(name, popen, log)
        self.procs.append(p)
        return p

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name} (pid {p.pid}) ---\n{tail(p.log)}" for p in self.procs)

    # starting
    def start_source(
        self,
        guest: Guest,
        *,
        wait_ready: bool = True,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
    ) -> Proc:
        cfg = self.workdir / "vm.toml"
        cfg.write_text(guest.toml("itest"))
        self.source = self._spawn("source", "source", ["run", str(cfg), "--control",
                                                       self.src_sock, "--json"],
                                  env=env, wrap=wrap)  # fmt: skip
        if wait_ready:
            self.wait_guest_ready(self.src_sock, self.source, timeout)
        return self.source

    def start_dest(
        self,
        timeout: float = 60,
        *,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
        listen_host: str | None = None,
    ) -> Proc:
        """Start ``migrated recv`` and wait until it listens.  ``listen_host`` overrides
        the address it binds (e.g. ``0.0.0.0`` to be reachable on every address of its
        namespace); :attr:`dest_addr` keeps naming :attr:`dest_host`."""
        listen = f"{listen_host or self.dest_host}:0"
        self.dest = self._spawn("dest", "dest", ["recv", "--listen", listen, "--control",
                                                 self.dst_sock, "--json"],
                                env=env, wrap=wrap)  # fmt: skip
        st = self.wait_for(
            lambda: (self.status(self.dst_sock) or {}).get("port"),
            timeout,
            "the destination to listen",
            procs=[self.dest],
        )
        self.dest_port = int(st)
        return self.dest

    def start(self, guest: Guest) -> None:
        self.start_dest()
        self.start_source(guest)

    def wait_guest_ready(self, sock: str, proc: Proc, timeout: float) -> None:
        def ready() -> bool:
            st = self.status(sock)
            vcpus = (st or {}).get("vm", {}).get("vcpus", [])
            return bool(vcpus) and all(
                (v["last_report"] or "").startswith(("ready", "verify")) for v in vcpus
            )

        self.wait_for(ready, timeout, "the guest to report ready", procs=[proc])

    # talking to the processes
    def status(self, sock: str) -> dict[str, Any] | None:
        """``status`` over the control socket; None when nobody answers (yet/anymore)."""
        try:
            return asyncio.run(asyncio.wait_for(request(sock, "status"), 30))
        except Exception:
            return None

    def migration_status(self, sock: str) -> str | None:
        st = self.status(sock)
        mig = (st or {}).get("migration") or {}
        return mig.get("status")

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """``migrated ARGS`` (a control client: runs in this namespace)."""
        try:
            return subprocess.run(
                [*MIGRATED, *args], capture_output=True, text=True, timeout=timeout,
                cwd=self.workdir,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"migrated {' '.join(args)} did not finish in {timeout} s\n{self.logs()}"
            ) from exc

    def send_args(self, mode: str, *extra: str, to: str | None = None) -> list[str]:
        return ["send", "--control", self.src_sock, "--to", to or self.dest_addr,
                "--mode", mode, "--json", *extra]  # fmt: skip

    def send(self, mode: str, *extra: str, timeout: float = 240) -> SendResult:
        r = self.cli(*self.send_args(mode, *extra), timeout=timeout)
        return SendResult.parse(r)

    def send_bg(self, mode: str, *extra: str) -> Proc:
        """Start ``migrated send`` in the background (its JSON events go to send.log)."""
        log = self.workdir / "send.log"
        with open(log, "ab") as f:
            popen = subprocess.Popen(
                [*MIGRATED, *self.send_args(mode, *extra)],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
            )  # fmt: skip
        p = Proc("send", popen, log)
        self.procs.append(p)
        return p

    def migrate_raw_bg(self, mode: str, **params: Any) -> Proc:
        """Start a ``migrate`` request on the source's control socket with the bare
        client (events in migrate.log, one JSON object a line)."""
        req = json.dumps({"cmd": "migrate", "to": self.dest_addr, "mode": mode, **params})
        log = self.workdir / "migrate.log"
        with open(log, "ab") as f:
            popen = subprocess.Popen(
                [sys.executable, "-c", RAW_CLIENT, self.src_sock, req],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
            )  # fmt: skip
        p = Proc("migrate", popen, log)
        self.procs.append(p)
        return p

    def verify(self, sock: str) -> subprocess.CompletedProcess[str]:
        return self.cli("verify", "--control", sock, timeout=180)

    def assert_verifies(self, sock: str, vcpus: int) -> list[str]:
        r = self.verify(sock)
        lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
        ok = [ln for ln in lines if ln.startswith("verify ok")]
        assert r.returncode == 0 and len(ok) == vcpus, (
            f"verify on {sock}: exit {r.returncode}, stdout {r.stdout!r}, stderr {r.stderr!r}\n"
            + self.logs()
        )
        return ok

    def wait_for(
        self,
        pred: Callable[[], Any],
        timeout: float,
        what: str,
        *,
        procs: list[Proc] | None = None,
        interval: float = 0.1,
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = pred()
            if value:
                return value
            for p in procs or []:
                if not p.alive():
                    raise AssertionError(
                        f"{p.name} exited with {p.popen.returncode} while waiting for "
                        f"{what}\n{self.logs()}"
                    )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\n"
                                     + self.logs())  # fmt: skip
            time.sleep(interval)

    def close(self) -> None:
        live = [p for p in self.procs if p.alive()]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.popen.terminate()
        deadline = time.monotonic() + 5
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(max(0.1, deadline - time.monotonic()))
        for p in live:  # SIGKILL what ignored SIGTERM (a split postcopy does, on purpose)
            if p.alive():
                with contextlib.suppress(ProcessLookupError):
                    p.popen.kill()
                p.popen.wait(30)
        for sock in (self.src_sock, self.dst_sock):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)


@dataclass
class SendResult:
    returncode: int
    events: list[dict[str, Any]]
    result: dict[str, Any]
    stderr: str
    stdout: str

    @classmethod
    def parse(cls, r: subprocess.CompletedProcess[str]) -> SendResult:
        events: list[dict[str, Any]] = []
        for line in r.stdout.splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        result = next((e for e in reversed(events) if e.get("event") == "result"), {})
        return cls(r.returncode, events, result, r.stderr, r.stdout)

    def states(self) -> list[str]:
        return [e["status"] for e in self.events if e.get("event") == "state"]


@contextlib.contextmanager
def workdir(prefix: str = "migrated-itest-") -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        if os.environ.get("MIGRATED_KEEP_WORKDIR") != "1":
            shutil.rmtree(d, ignore_errors=True)
