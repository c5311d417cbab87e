"""Fault injection for the integration tests, on top of pair.py's Netns and Pair.

Every fault here is real: nftables rules that drop every packet between the two
namespaces (a black hole: no RST, no FIN, the peers only hear silence), ``ip link set
down`` on the destination's veth, ``tbf`` rate limits that make a phase last seconds
with a small guest, signals to either VM process (SIGKILL, SIGTERM, SIGSTOP/SIGCONT),
a memory cgroup of our own with a limit, and the engine's fault hook
``MIGRATED_FAULT=ACTION:DIRECTION:MESSAGE[:N]`` (see migrated/transport/faults.py), which
aborts every connection of the session at a given message boundary.

The proofs of the end state:

* :func:`assert_runs_only_on`: the VM runs (all vCPUs) on exactly one side and the
  guest verifies every page there (memstress ``verify``); the other side holds no
  running copy.
* :func:`assert_both_paused`: both sides report ``postcopy-paused``.
* :class:`RunWatch`: samples both sides while a scenario runs and fails if a copy
  ran on the source after the destination had run the guest, or if the destination
  ran the guest although the migration ended before the commit ("no copy runs
  twice").  Together with the state history each side logs (``state`` events).
* :func:`assert_failure_message`: a failure names phase, side, a non-empty reason
  and the next command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrated.service.control import request
from migrated.vmm.hostmem import HostMemory

from .pair import MIGRATED, Guest, Netns, Pair, Proc, SendResult

#: The scenarios' guest: small, one vCPU, writing all the time (a stale or lost page
#: fails its verify).
GUEST = Guest(memory_mib=64, vcpus=1, hot_set_mib=8, writes_per_s=20000)

# -- the engine's fault hook -----------------------------------------------------------

ACTIONS = ("cut-before", "cut-after")
DIRECTIONS = ("sent", "recv")
#: The v2 messages the scenarios cut at, and which side sends each.
SENDER = {
    "Setup": "source",
    "SetupAck": "destination",
    "PrecopyRoundEnd": "source",
    "PrecopyRoundAck": "destination",
    "Switchover": "source",
    "VmState": "source",
    "Ready": "destination",
    "Commit": "source",
    "Running": "destination",
    "ReceivedBitmap": "destination",
    "AllSent": "source",
    "Complete": "destination",
}


def fault(action: str, direction: str, message: str, n: int = 1) -> dict[str, str]:
    """The environment that makes a ``migrated run``/``recv`` process abort every
    connection of the session at the ``n``-th ``message`` it sends or receives."""
    if action not in ACTIONS or direction not in DIRECTIONS or message not in SENDER or n < 1:
        raise ValueError(f"bad fault {action}:{direction}:{message}:{n}")
    return {"MIGRATED_FAULT": f"{action}:{direction}:{message}:{n}"}


def fault_fired(proc: Proc) -> bool:
    """The process logged the hook's ``fault injected: ...`` line."""
    return "fault injected" in proc.log.read_text(errors="replace")


# -- the network -----------------------------------------------------------------------


def _run(*cmd: str) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


class BlackHole:
    """nftables rules in the destination's namespace that drop every TCP packet to
    and from ``addr`` (default: the destination's address), in both directions.
    Nothing is answered: the peers see silence, never a reset.  With ``reject`` every
    packet to ``addr`` is answered with a TCP reset instead (a host that refuses: a
    connection attempt fails at once).  Idempotent :meth:`add`/:meth:`remove`; a
    context manager."""

    def __init__(self, net: Netns, addr: str | None = None, *, reject: bool = False) -> None:
        self.net = net
        self.addr = addr or net.dst_ip
        self.reject = reject
        self.table = "migtest_reject" if reject else "migtest_blackhole"
        self.active = False

    def add(self) -> None:
        if self.active:
            return
        if self.reject:
            rules = f"""
  chain input {{ type filter hook input priority -10; policy accept;
    ip daddr {self.addr} meta l4proto tcp reject with tcp reset; }}"""
        else:
            rules = f"""
  chain input {{ type filter hook input priority -10; policy accept;
    ip daddr {self.addr} meta l4proto tcp drop; }}
  chain output {{ type filter hook output priority -10; policy accept;
    ip saddr {self.addr} meta l4proto tcp drop; }}"""
        ruleset = f"table inet {self.table} {{{rules}\n}}\n"
        r = subprocess.run(
            ["ip", "netns", "exec", self.net.dst_ns, "nft", "-f", "-"],
            input=ruleset,
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(f"nft in {self.net.dst_ns} failed: {r.stderr.strip()}")
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        _run("ip", "netns", "exec", self.net.dst_ns, "nft", "delete", "table", "inet", self.table)
        self.active = False

    def __enter__(self) -> BlackHole:
        self.add()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def link_down(net: Netns) -> None:
    """A hard cut: the destination's end of the veth goes down (no packets either way;
    the sockets are not told)."""
    net.link(False)


def link_up(net: Netns) -> None:
    net.link(True)


def cut(net: Netns, port: int) -> None:
    """Link down and every connection of the migration aborted on both hosts: what
    each kernel does once it gives up on a dead link, without waiting minutes."""
    net.link(False)
    net.abort_connections(port)


def rate_limit_both(net: Netns, mbytes_per_s: float) -> None:
    """``tbf`` on the source's egress (pages) and on the destination's (answers)."""
    net.rate_limit(mbytes_per_s)
    rate = f"{int(mbytes_per_s * 8)}mbit"
    _run("ip", "netns", "exec", net.dst_ns, "tc", "qdisc", "add", "dev", net.dst_if, "root",
         "tbf", "rate", rate, "burst", "256kb", "latency", "100ms")  # fmt: skip


def clear_rate_limits(net: Netns) -> None:
    for ns, dev in ((net.src_ns, net.src_if), (net.dst_ns, net.dst_if)):
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                       capture_output=True)  # fmt: skip


def add_dest_address(net: Netns, addr: str) -> None:
    """A second address on the destination's veth (for ``recover --to``)."""
    _run("ip", "-n", net.dst_ns, "addr", "add", f"{addr}/24", "dev", net.dst_if)


# -- processes ---------------------------------------------------------------------------


@dataclass
class SendProc:
    """A background ``migrated send --json``: events on stdout (``send.out``), the
    human failure message on stderr (``send.err``), kept apart."""

    proc: Proc
    err: Path

    def result(self, timeout: float = 90) -> SendResult:
        code = self.proc.wait(timeout)
        out = self.proc.log.read_text(errors="replace")
        err = self.err.read_text(errors="replace")
        return SendResult.parse(subprocess.CompletedProcess([], code, out, err))

    def events(self) -> list[dict[str, Any]]:
        return log_events(self.proc)


def start_send(pair: Pair, mode: str, *extra: str, to: str | None = None) -> SendProc:
    """``migrated send`` in the background (see :class:`SendProc`)."""
    out, err = pair.workdir / "send.out", pair.workdir / "send.err"
    with open(out, "ab") as fo, open(err, "ab") as fe:
        popen = subprocess.Popen(
            [*MIGRATED, *pair.send_args(mode, *extra, to=to)],
            stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=pair.workdir,
        )  # fmt: skip
    p = Proc("send", popen, out)
    pair.procs.append(p)
    return SendProc(p, err)


def send_signal(proc: Proc, sig: int) -> None:
    os.kill(proc.pid, sig)


@contextlib.contextmanager
def stopped(proc: Proc) -> Iterator[None]:
    """SIGSTOP ``proc`` for the duration of the block; SIGCONT on the way out (also on
    failure, so the fixtures can stop it)."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)


def terminate(proc: Proc) -> None:
    """SIGTERM, as systemd or an operator's ``kill`` sends it."""
    os.kill(proc.pid, signal.SIGTERM)


# -- a memory cgroup -----------------------------------------------------------------------


class CgroupUnavailable(RuntimeError):
    """No memory controller this process can create cgroups in (the test skips)."""


@dataclass
class MemoryCgroup:
    """A memory cgroup of our own with a hard limit: v1 ``memory.limit_in_bytes``, or
    v2 ``memory.max`` (and ``memory.swap.max`` 0).  On v1 it is created inside this
    process's own memory cgroup (the limits above still apply); on v2 at the top of
    the hierarchy (the "no internal processes" rule forbids a child of a cgroup that
    has processes).  :meth:`wrap` is a command prefix that joins it and execs."""

    limit_bytes: int
    name: str = field(default_factory=lambda: f"migtest-{os.getpid()}-{os.urandom(2).hex()}")
    path: Path = field(init=False)
    version: int = field(init=False)

    def __post_init__(self) -> None:
        if os.geteuid() != 0:
            raise CgroupUnavailable("creating cgroups needs root")
        levels = HostMemory().cgroup_dirs("memory")
        if levels and levels[0][0] == 1:
            self.version, parent = 1, levels[0][1]
        else:
            self.version, parent = 2, self._v2_root()
        self.path = parent / self.name
        try:
            self.path.mkdir()
        except OSError as exc:
            raise CgroupUnavailable(f"mkdir {self.path}: {exc}") from exc
        try:
            if self.version == 1:
                (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
            else:
                (self.path / "memory.max").write_text(str(self.limit_bytes))
                with contextlib.suppress(FileNotFoundError):
                    (self.path / "memory.swap.max").write_text("0")
        except OSError:
            self.path.rmdir()
            raise

    @staticmethod
    def _v2_root() -> Path:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                root = Path(left.split()[4])
                ctl = root / "cgroup.subtree_control"
                if "memory" not in ctl.read_text().split():
                    try:
                        ctl.write_text("+memory")
                    except OSError:
                        continue
                return root
        raise CgroupUnavailable("no cgroup v1 memory controller and no cgroup2 with memory")

    def wrap(self) -> list[str]:
        """``[*wrap(), cmd, ...]`` runs cmd inside this cgroup from its first instruction
        (the shell moves itself, then execs: same PID)."""
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path)]

    def usage_bytes(self) -> int:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def procs(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        """Kill what is left inside, then remove the cgroup (retried while the kernel
        lets go of the dying tasks)."""
        for pid in self.procs():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


# -- what the processes said -------------------------------------------------------------


def log_events(proc: Proc) -> list[dict[str, Any]]:
    """The JSON event lines a process (``--json``) wrote to its log."""
    out = []
    for line in proc.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            e = json.loads(line)
            if isinstance(e, dict):
                out.append(e)
    return out


def state_history(proc: Proc, side: str | None = None) -> list[str]:
    """The session states a process reported, in order (``state`` events)."""
    return [
        e["status"]
        for e in log_events(proc)
        if e.get("event") == "state" and (side is None or e.get("side") == side)
    ]


#: States in which the destination has run (or may run) the guest: after the commit.
POST_COMMIT = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover", "completed"})


# -- proofs of the end state ---------------------------------------------------------------


def quick_status(sock: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """``status`` over the control socket; None when nobody answers within
    ``timeout_s`` (a SIGSTOPped process accepts the connection but never answers)."""
    try:
        return asyncio.run(asyncio.wait_for(request(sock, "status"), timeout_s))
    except Exception:
        return None


def migration_status(sock: str) -> str | None:
    mig = (quick_status(sock) or {}).get("migration") or {}
    return mig.get("status")


def vm_runs(pair: Pair, sock: str) -> bool:
    """The process on ``sock`` answers and its VM runs with every vCPU running."""
    st = quick_status(sock)
    vm = (st or {}).get("vm") or {}
    vcpus = vm.get("vcpus") or []
    return (
        vm.get("runstate") == "running"
        and bool(vcpus)
        and all(v.get("runstate") == "running" for v in vcpus)
    )


def where(pair: Pair) -> list[str]:
    """The sides whose VM runs now ("source", "destination")."""
    return [side for side, sock in (("source", pair.src_sock), ("destination", pair.dst_sock))
            if vm_runs(pair, sock)]  # fmt: skip


def assert_runs_only_on(pair: Pair, side: str, vcpus: int = 1, *, verify: bool = True) -> None:
    """The VM runs on ``side`` and nowhere else, and (``verify``) the guest checks every
    page of its memory there."""
    sides = where(pair)
    assert sides == [side], f"the VM runs on {sides or 'no side'}, expected only {side}\n" + (
        pair.logs()
    )
    if verify:
        pair.assert_verifies(pair.src_sock if side == "source" else pair.dst_sock, vcpus)


def assert_both_paused(pair: Pair, timeout: float = 20) -> None:
    pair.wait_for(
        lambda: (
            migration_status(pair.src_sock) == "postcopy-paused"
            and migration_status(pair.dst_sock) == "postcopy-paused"
        ),
        timeout,
        "both sides to report postcopy-paused",
    )


def wait_status(pair: Pair, sock: str, states: str | tuple[str, ...], timeout: float = 30,
                procs: list[Proc] | None = None) -> str:  # fmt: skip
    """Wait until the migration on ``sock`` reports one of ``states``; returns it."""
    wanted = (states,) if isinstance(states, str) else states
    return str(
        pair.wait_for(
            lambda: s if (s := migration_status(sock)) in wanted else None,
            timeout,
            f"{sock} to report {' or '.join(wanted)}",
            procs=procs,
            interval=0.02,
        )
    )


def wait_bytes(pair: Pair, send: SendProc, nbytes: int, timeout: float = 30) -> None:
    """Wait until ``send`` reports (progress events) that ``nbytes`` have moved: a
    point inside precopy or postcopy.  (``status`` counts the BULK push only when it
    ends.)"""

    def moved() -> bool:
        progress = [e for e in send.events() if e.get("event") == "progress"]
        return bool(progress) and int(progress[-1].get("transferred_bytes", 0)) >= nbytes

    pair.wait_for(moved, timeout, f"send to report {nbytes >> 20} MiB moved",
                  procs=[send.proc], interval=0.05)  # fmt: skip


@dataclass
class Sample:
    t: float
    side: str
    runs: bool
    status: str | None


class RunWatch:
    """Samples both sides every ``interval_s`` from a thread, for "no copy runs twice".

    Sound because the source pauses its VM before it commits and the destination
    starts vCPUs only after the commit: any source sample that says "running",
    taken after a sample that saw the destination's VM running, is a second copy.
    """

    def __init__(self, pair: Pair, interval_s: float = 0.1) -> None:
        self.pair = pair
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="runwatch", daemon=True)

    def __enter__(self) -> RunWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for side, sock in (("source", self.pair.src_sock), ("destination",
                                                                 self.pair.dst_sock)):  # fmt: skip
                st = quick_status(sock, 1.0)
                vm = (st or {}).get("vm") or {}
                runs = vm.get("runstate") == "running"
                mig = (st or {}).get("migration") or {}
                self.samples.append(Sample(time.monotonic(), side, runs, mig.get("status")))
            self._stop.wait(self.interval_s)

    def destination_ran(self) -> bool:
        return any(s.side == "destination" and s.runs for s in self.samples)

    def assert_no_second_copy(self) -> None:
        first_dst = next((s.t for s in self.samples if s.side == "destination" and s.runs), None)
        if first_dst is None:
            return
        late = [s for s in self.samples if s.side == "source" and s.t > first_dst and s.runs]
        assert not late, (
            f"the source VM ran {late[-1].t - first_dst:.1f} s after the destination's had "
            f"run: two copies of one VM\n" + self.pair.logs()
        )

    def assert_destination_never_ran(self) -> None:
        ran = [s for s in self.samples if s.side == "destination" and s.runs]
        assert not ran, f"the destination ran the guest ({len(ran)} samples)\n" + self.pair.logs()


def assert_destination_never_committed(pair: Pair) -> None:
    """From the destination's own log: it never entered a post-commit state."""
    assert pair.dest is not None
    hist = state_history(pair.dest, "destination")
    assert not POST_COMMIT.intersection(hist), (
        f"the destination went through {hist}: it ran the guest" + "\n" + pair.logs()
    )


def settle_destination_after_abort(
    pair: Pair, timeout: float = 15, *, allow_idle: bool = False
) -> None:
    """After a failure before the commit: the destination must give the guest up,
    by itself (it exits, or reports failed/cancelled) or, where it is in doubt
    (``ready``), when the operator discards it with ``migrated cancel --force``.
    It never runs the guest."""
    dest = pair.dest
    assert dest is not None

    def settled() -> str | None:
        if not dest.alive():
            return "exited"
        s = migration_status(pair.dst_sock)
        if s in (None, "setup") and allow_idle and quick_status(pair.dst_sock) is not None:
            return "idle"  # still listening, no session yet (the fault came in setup)
        return s if s in ("failed", "cancelled", "ready") else None

    state = pair.wait_for(settled, timeout, "the destination to give up or wait in ready",
                          interval=0.05)  # fmt: skip
    if state == "ready":
        r = pair.cli("cancel", "--force", "--control", pair.dst_sock, timeout=60)
        assert r.returncode == 0, f"cancel --force on the destination: {r.returncode} {r.stderr}"
    assert not vm_runs(pair, pair.dst_sock), "the destination runs the guest\n" + pair.logs()
    assert_destination_never_committed(pair)


# -- failure messages ----------------------------------------------------------------------

#: Words that name a phase in a failure message (status strings and their prose).
PHASE_WORDS = {
    "setup": ("setup",),
    "precopy": ("precopy", "active"),
    "switchover": ("switchover", "device", "ready", "commit", "vm state"),
    "postcopy": ("postcopy",),
    "recovery": ("recover", "postcopy-paused", "paused"),
}
_NEXT = re.compile(r"migrated (send|recover|cont|cancel|status|verify|stop|run|recv)\b")
_EMPTY_REASON = re.compile(r":\s*(?:$|\n|;)", re.MULTILINE)


def failure_text(r: SendResult) -> str:
    """Everything ``send`` said about its failure: stderr, and the error of its result."""
    res = r.result or {}
    parts = [r.stderr, json.dumps(res.get("error", "")), str(res.get("hint", ""))]
    return "\n".join(p for p in parts if p)


def assert_failure_message(
    text: str,
    *,
    phase: str | tuple[str, ...],
    side: str | None,
    reason: tuple[str, ...],
    next_cmd: tuple[str, ...],
) -> None:
    """The message names the phase (one of :data:`PHASE_WORDS`; with a tuple, any of
    those phases), the side (``source``
    or ``destination``; None: either), a reason (one of ``reason``, case-insensitive,
    never an empty one after a colon) and the next command (``migrated CMD`` with
    CMD in ``next_cmd``)."""
    low = text.lower()
    phases = (phase,) if isinstance(phase, str) else phase
    words = [w for p in phases for w in PHASE_WORDS[p]]
    assert any(w in low for w in words), f"no phase ({'/'.join(phases)}) in: {text!r}"
    sides = ("source", "destination") if side is None else (side,)
    assert any(s in low for s in sides), f"no side ({'/'.join(sides)}) in: {text!r}"
    assert any(w.lower() in low for w in reason), f"no reason ({'/'.join(reason)}) in: {text!r}"
    assert not _EMPTY_REASON.search(text.split("what to do")[0].rstrip()), (
        f"an empty reason in: {text!r}"
    )
    cmds = set(_NEXT.findall(text))
    assert cmds & set(next_cmd), f"no next command (migrated {'/'.join(next_cmd)}) in: {text!r}"


# -- outcomes of a scenario ----------------------------------------------------------------

#: Words of a reason for a broken link or a dead peer.
LINK_REASONS = ("reset", "abort", "closed", "lost", "refused", "heartbeat", "broken",
                "timed out", "timeout", "went away", "died", "killed", "no answer",
                "fault injected")  # fmt: skip
HEARTBEAT = re.compile(r"no heartbeat from the (source|destination) for \d+(\.\d+)? s")


def expect_aborted(
    pair: Pair,
    r: SendResult,
    watch: RunWatch,
    *,
    phase: str | tuple[str, ...],
    side: str | None = None,
    reason: tuple[str, ...] = LINK_REASONS,
    allow_idle_destination: bool = False,
) -> None:
    """Failed before the commit: ``send`` exits 1 naming phase, side, reason and the
    next command; the VM runs on the source only and verifies; the destination gives
    the guest up and never ran it."""
    text = failure_text(r)
    assert r.returncode == 1, f"send exited {r.returncode}, expected 1\n{text}\n{pair.logs()}"
    assert_failure_message(text, phase=phase, side=side, reason=reason, next_cmd=("send",))
    assert pair.source is not None and pair.source.alive(), pair.logs()
    assert_runs_only_on(pair, "source", GUEST.vcpus)
    settle_destination_after_abort(pair, allow_idle=allow_idle_destination)
    watch.assert_destination_never_ran()
    # The source accepts another migration command: the failed one is over.
    st = quick_status(pair.src_sock) or {}
    assert ((st.get("migration") or {}).get("status")) in ("failed", "cancelled", None), st


def expect_completed_on_destination(pair: Pair, r: SendResult, watch: RunWatch) -> None:
    """The migration finished: ``send`` exits 0, the source process leaves, the VM
    runs on the destination only and verifies, and no second copy ever ran."""
    assert r.returncode == 0, (
        f"send exited {r.returncode}, expected 0\n{failure_text(r)}\n{pair.logs()}"
    )
    assert pair.source is not None
    assert pair.source.wait(60) == 0, pair.logs()
    assert migration_status(pair.dst_sock) == "completed", pair.logs()
    assert_runs_only_on(pair, "destination", GUEST.vcpus)
    watch.assert_no_second_copy()


def expect_fault_fired(*procs: Proc) -> None:
    """The engine's hook fired in one of ``procs`` (its ``fault injected`` line)."""
    assert any(fault_fired(p) for p in procs), (
        "MIGRATED_FAULT did not fire: no 'fault injected' line in "
        + ", ".join(p.log.name for p in procs)
    )
