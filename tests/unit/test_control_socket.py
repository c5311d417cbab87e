"""Claiming a control-socket path (migrated.service.control), with real processes:
a non-socket is refused and never unlinked, a live listener is refused naming its PID
(SO_PEERCRED), a lock holder is refused naming its PID, only a stale socket is
replaced, and of several processes that start at once on one path exactly one wins."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrated.errors import ConfigError
from migrated.service.control import ControlServer, request

ROOT = Path(__file__).resolve().parents[2]

#: A process serving a control socket: prints "ready PID" or "refused: MESSAGE" (exit 2).
#: With argv[2] set, it first waits until that file exists (a start line for races).
SERVER = """
import asyncio, os, signal, sys, time
from migrated.errors import ConfigError
from migrated.service.control import ControlServer

async def status(req, emit):
    return {"pid": os.getpid()}

async def main():
    if len(sys.argv) > 2:
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.0005)
    server = ControlServer(sys.argv[1], {"status": status})
    try:
        await server.start()
    except ConfigError as exc:
        print("refused:", exc, "|", exc.hint, flush=True)
        sys.exit(2)
    print("ready", os.getpid(), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), 3600)
    finally:
        await server.close()

asyncio.run(main())
"""


def spawn_server(path: Path, start_file: Path | None = None) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", SERVER, str(path)] + ([str(start_file)] if start_file else [])
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def first_line(p: subprocess.Popen[str], timeout: float = 30) -> str:
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while not line and time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line and p.poll() is not None:
            break
    assert line, f"server said nothing (exit {p.poll()}): {p.stderr.read() if p.stderr else ''}"
    return line.strip()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    ps: list[subprocess.Popen[str]] = []
    yield ps
    for p in ps:
        if p.poll() is None:
            p.terminate()
    for p in ps:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


async def _start(path: Path) -> ControlServer:
    async def status(req: dict, emit: object) -> dict:
        return {"pid": os.getpid()}

    server = ControlServer(str(path), {"status": status})
    await server.start()
    return server


def peer_pid(path: Path) -> int:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


async def test_regular_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    cfg = tmp_path / "vm.toml"
    cfg.write_text('name = "precious"\n')
    with pytest.raises(ConfigError) as ei:
        await _start(cfg)
    msg = str(ei.value)
    assert str(cfg) in msg and "a regular file, not a socket" in msg, msg
    assert "config file" in ei.value.hint
    assert ei.value.exit_code == 2
    assert cfg.read_text() == 'name = "precious"\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.toml"]  # no lock left


async def test_directory_and_symlink_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(ConfigError, match="a directory"):
        await _start(d)
    assert d.is_dir()
    link = tmp_path / "link.sock"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="a symbolic link"):
        await _start(link)
    assert link.is_symlink()


async def test_live_listener_is_refused_naming_its_pid(tmp_path: Path, procs: list) -> None:
    path = tmp_path / "vm.sock"
    p = spawn_server(path)
    procs.append(p)
    assert first_line(p) == f"ready {p.pid}"
    with pytest.raises(ConfigError) as ei:
        await _start(path)
    assert f"PID {p.pid}" in str(ei.value), str(ei.value)
    assert f"`migrated stop --control {path}`" in ei.value.hint
    # The first server is untouched and still answers.
    assert (await request(str(path), "status"))["pid"] == p.pid
    # Without its lock file (an older migrated, or the file removed by hand) the live
    # listener itself is found: connect + SO_PEERCRED.
    os.unlink(str(path) + ".lock")
    with pytest.raises(ConfigError) as ei:
        await _start(path)
    assert f"PID {p.pid} (" in str(ei.value) and "listens on it" in str(ei.value)
    assert (await request(str(path), "status"))["pid"] == p.pid


async def test_stopped_listener_is_still_live(tmp_path: Path, procs: list) -> None:
    """A SIGSTOPped VM process cannot answer, but its socket is not stale."""
    path = tmp_path / "vm.sock"
    p = spawn_server(path)
    procs.append(p)
    first_line(p)
    os.unlink(str(path) + ".lock")
    os.kill(p.pid, signal.SIGSTOP)
    try:
        with pytest.raises(ConfigError, match=f"PID {p.pid}"):
            await _start(path)
    finally:
        os.kill(p.pid, signal.SIGCONT)
    assert (await request(str(path), "status"))["pid"] == p.pid


async def test_lock_holder_is_refused_naming_its_pid(tmp_path: Path, procs: list) -> None:
    """A process that holds the lock but has not bound yet (it is starting)."""
    path = tmp_path / "vm.sock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); print('held',"
         " flush=True); time.sleep(60)", str(path) + ".lock"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs.append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError) as ei:
        await _start(path)
    assert f"PID {holder.pid} (" in str(ei.value) and "lock file" in str(ei.value)
    assert not path.exists()
    holder.kill()
    holder.wait(5)
    server = await _start(path)  # the lock died with its holder
    await server.close()


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    # A socket file whose process died without cleaning up (SIGKILL).
    p = subprocess.Popen(
        [sys.executable, "-c",
         "import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]);"
         "s.listen(); print('bound', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().strip() == "bound"
    p.kill()
    p.wait(5)
    server = await _start(path)
    try:
        assert peer_pid(path) == os.getpid()  # the socket is ours now
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert (await request(str(path), "status"))["pid"] == os.getpid()
    finally:
        await server.close()
    assert not path.exists() and not Path(str(path) + ".lock").exists()


async def test_close_leaves_a_socket_that_is_not_ours(tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    server = await _start(path)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    try:
        await server.close()
        assert path.exists(), "close() removed a socket it did not create"
    finally:
        other.close()


async def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lock file") as ei:
        await _start(tmp_path / "no" / "such" / "vm.sock")
    assert "directory" in ei.value.hint


def test_simultaneous_starts_one_wins(tmp_path: Path, procs: list) -> None:
    """Several processes start at the same instant on a path that holds a stale
    socket (each would find it stale and replace it): exactly one serves it, every
    other one is refused naming the winner, and the socket answers the winner."""
    for round_no in range(3):
        path = tmp_path / f"vm{round_no}.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()  # the file stays, nobody listens
        go = tmp_path / f"go{round_no}"
        ps = [spawn_server(path, go) for _ in range(4)]
        procs.extend(ps)
        time.sleep(1.0)  # let all of them reach the start line
        go.touch()
        lines = {p.pid: first_line(p) for p in ps}
        winners = [pid for pid, line in lines.items() if line.startswith("ready")]
        assert len(winners) == 1, lines
        (winner,) = winners
        for pid, line in lines.items():
            if pid != winner:
                assert line.startswith("refused:") and f"PID {winner}" in line, lines
        assert peer_pid(path) == winner
        assert asyncio.run(request(str(path), "status"))["pid"] == winner
        for p in ps:
            p.terminate()
            p.wait(10)
        assert not path.exists(), "the winner's socket outlived it"
