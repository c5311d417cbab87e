"""The boot ABI's port devices: console, status reports, command mailbox, clock, sleep.

Facts we rely on:

* Every port exit is handled on the exiting vCPU's own thread, which is the only thread
  that may read that vCPU's registers for a status report (it owns the vCPU; another
  thread's vCPU ioctl would wait for KVM_RUN to return anyway).
* The objects here are shared by all vCPU threads and the controlling thread, so each
  guards its state with its own lock; none of them touches guest memory.
"""

from __future__ import annotations

import enum
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

__all__ = [
    "PORT_CLOCK_US",
    "PORT_COMMAND",
    "PORT_CONSOLE",
    "PORT_SLEEP_US",
    "PORT_STATUS",
    "Command",
    "CommandMailbox",
    "Console",
    "StatusBoard",
    "StatusCode",
    "StatusReport",
]

PORT_CONSOLE = 0x3F8
PORT_STATUS = 0x510
PORT_COMMAND = 0x511
PORT_CLOCK_US = 0x512
PORT_SLEEP_US = 0x513


class StatusCode(enum.IntEnum):
    READY = 1
    VERIFY_OK = 2
    VERIFY_FAIL = 3
    PROGRESS = 4
    HALT = 5


class Command(enum.IntEnum):
    NONE = 0
    VERIFY = 1
    STOP = 2


@dataclass(frozen=True)
class StatusReport:
    """One OUT to the status port: ``code`` from EAX, ``args`` from RBX, RCX, RSI, RDI.

    ``seq`` counts the reports of this vCPU (1, 2, ...), so "a report newer than
    the one I saw" is ``seq > seen``.  ``wall_time_s`` is when the VMM received it.
    """

    vcpu: int
    seq: int
    code: int
    args: tuple[int, int, int, int]
    wall_time_s: float

    @property
    def kind(self) -> str:
        try:
            return StatusCode(self.code).name
        except ValueError:
            return f"CODE_{self.code}"

    @property
    def ok(self) -> bool:
        return self.code == StatusCode.VERIFY_OK

    @property
    def text(self) -> str:
        """A human sentence, e.g. ``verify ok, 65000 pages, pass 3``."""
        a, b, c, d = self.args
        if self.code == StatusCode.READY:
            return f"ready, {a} of {b} data pages filled, hot set {c} pages"
        if self.code == StatusCode.VERIFY_OK:
            return f"verify ok, {a} pages, pass {b}"
        if self.code == StatusCode.VERIFY_FAIL:
            return (
                f"VERIFY FAIL at gpa {a:#x}: expected {b:#018x} found {c:#018x} "
                f"(page generation {d})"
            )
        if self.code == StatusCode.PROGRESS:
            return f"{a} writes"
        if self.code == StatusCode.HALT:
            return f"halted (code {a})"
        return f"status code {self.code}, args {a:#x} {b:#x} {c:#x} {d:#x}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "vcpu": self.vcpu,
            "seq": self.seq,
            "code": self.code,
            "args": list(self.args),
            "wall_time_s": self.wall_time_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatusReport:
        a = tuple(int(x) for x in d["args"])
        if len(a) != 4:
            raise ValueError("a status report has exactly 4 arguments")
        return cls(int(d["vcpu"]), int(d["seq"]), int(d["code"]), a, float(d["wall_time_s"]))


class Console:
    """Bytes the guest writes to port 0x3F8: to stdout, a file (appended), or nowhere.

    Keeps a count and the last few KiB (``tail``) for status and tests.
    """

    TAIL_BYTES = 4096

    def __init__(self, target: str, *, bytes_written: int = 0) -> None:
        self.target = target
        self.bytes_written = bytes_written
        self._lock = threading.Lock()
        self._tail = bytearray()
        self._file: IO[bytes] | None = None
        self._owns_file = False
        if target == "stdout":
            self._file = sys.stdout.buffer
        elif target != "none":
            self._file = open(target, "ab")  # noqa: SIM115 - closed by close()
            self._owns_file = True

    def write(self, data: bytes) -> None:
        with self._lock:
            self.bytes_written += len(data)
            self._tail += data
            if len(self._tail) > 2 * self.TAIL_BYTES:
                del self._tail[: -self.TAIL_BYTES]
            if self._file is not None:
                self._file.write(data)
                if b"\n" in data:
                    self._file.flush()

    def tail(self) -> bytes:
        with self._lock:
            return bytes(self._tail[-self.TAIL_BYTES :])

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                if self._owns_file:
                    self._file.close()
                self._file = None


class CommandMailbox:
    """Commands the guest polls on port 0x511, one slot per vCPU.

    A read returns the pending command and clears it, except STOP, which stays (a guest
    that misses it must still stop).
    """

    def __init__(self, vcpus: int, pending: Sequence[int] | None = None) -> None:
        self._lock = threading.Lock()
        self._pending = list(pending) if pending is not None else [Command.NONE] * vcpus
        if len(self._pending) != vcpus:
            raise ValueError(f"{len(self._pending)} pending commands for {vcpus} vCPUs")

    def post(self, command: Command) -> None:
        with self._lock:
            for i, cur in enumerate(self._pending):
                if cur != Command.STOP:
                    self._pending[i] = command

    def take(self, vcpu: int) -> int:
        with self._lock:
            cmd = self._pending[vcpu]
            if cmd != Command.STOP:
                self._pending[vcpu] = Command.NONE
            return int(cmd)

    def pending(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(int(c) for c in self._pending)


class StatusBoard:
    """The latest report of each code from each vCPU, and a way to wait for new ones."""

    def __init__(self, vcpus: int) -> None:
        self.cond = threading.Condition()
        self._seq = [0] * vcpus
        self._last: list[dict[int, StatusReport]] = [{} for _ in range(vcpus)]
        self._latest: list[StatusReport | None] = [None] * vcpus

    @classmethod
    def restore(
        cls, vcpus: int, seqs: Sequence[int], reports: Sequence[StatusReport]
    ) -> StatusBoard:
        board = cls(vcpus)
        board._seq = list(seqs)
        for r in sorted(reports, key=lambda r: r.seq):
            board._last[r.vcpu][r.code] = r
            board._latest[r.vcpu] = r
        return board

    def post(self, vcpu: int, code: int, args: tuple[int, int, int, int]) -> StatusReport:
        with self.cond:
            self._seq[vcpu] += 1
            report = StatusReport(vcpu, self._seq[vcpu], code, args, time.time())
            self._last[vcpu][code] = report
            self._latest[vcpu] = report
            self.cond.notify_all()
            return report

    def marks(self) -> tuple[int, ...]:
        """The current report sequence number of every vCPU."""
        with self.cond:
            return tuple(self._seq)

    def latest(self, vcpu: int, code: int | None = None) -> StatusReport | None:
        with self.cond:
            if code is None:
                return self._latest[vcpu]
            return self._last[vcpu].get(code)

    def all_reports(self) -> list[StatusReport]:
        with self.cond:
            return [r for per in self._last for r in per.values()]

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait(
        self,
        codes: Sequence[int],
        vcpus: Sequence[int],
        since: Sequence[int],
        timeout_s: float,
        check: Callable[[], None],
    ) -> tuple[StatusReport, ...]:
        """For each vCPU in ``vcpus``, the newest report with a code in ``codes`` and
        ``seq > since[vcpu]``.  ``check()`` runs on every wake-up and may raise (a
        crash).  Raises TimeoutError naming the vCPUs still missing."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                check()
                found: dict[int, StatusReport] = {}
                for v in vcpus:
                    newest = [r for c in codes if (r := self._last[v].get(c)) and r.seq > since[v]]
                    if newest:
                        found[v] = max(newest, key=lambda r: r.seq)
                if len(found) == len(vcpus):
                    return tuple(found[v] for v in vcpus)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(vcpus) - set(found))
                    names = "/".join(
                        StatusCode(c).name if c in StatusCode._value2member_map_ else str(c)
                        for c in codes
                    )
                    raise TimeoutError(
                        f"no {names} report from vCPU(s) {missing} within {timeout_s:g} s"
                    )
                self.cond.wait(remaining)
