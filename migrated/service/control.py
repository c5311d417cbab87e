"""The control socket of a VM process: JSON lines over a Unix stream socket.

A client sends one request line ``{"cmd": NAME, ...}``.  The server answers with zero
or more event lines ``{"event": ...}`` (long commands such as ``migrate`` stream their
progress) and ends with exactly one line: ``{"result": {...}}`` or
``{"error": {"message": ..., "hint": ..., "exit_code": N}}``, then closes.

Requests are bounded (64 KiB per line); an unknown command or a malformed line is an
error reply naming it.  The socket file is created with mode 0600: whoever can
connect can migrate or stop the VM.

Claiming the path (an operator may point ``--control`` anywhere, and two processes may
start at once with the same path):

* ``PATH.lock`` beside the socket is held with ``flock`` for the server's lifetime and
  holds its PID.  A second process finds it locked and is refused with that PID; the
  lock is what makes "check, then replace a stale socket" safe against a concurrent
  start.  After taking the lock we check that the file we locked is still the one at
  that path (a closing server unlinks it), else we try again.
* A path that exists and is not a socket (a config file, a directory, a symlink) is
  refused and never unlinked.
* A socket with a live listener (``connect`` succeeds) is refused naming the PID that
  holds it (``SO_PEERCRED``) and its command line.  A listener that cannot even take
  a connection (backlog full) is refused too: only ECONNREFUSED proves a socket stale.
* Only a stale socket is unlinked.  The new socket is bound by us (``bind`` never
  replaces a file), then handed to asyncio; asyncio's own ``create_unix_server(path)``
  would unlink whatever socket is there, live or not.
* On close we unlink the socket only if it is still the inode we bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from migrated.errors import ConfigError, ControlError, MigratedError

__all__ = ["ControlClient", "ControlServer", "Handler", "request", "stream"]

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
Emit = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Emit], Awaitable[dict[str, Any]]]


class ControlServer:
    """Serves ``handlers[cmd](request, emit) -> result`` on a Unix socket."""

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock: _PathLock | None = None
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        """Claim the path (see the module notes) and listen.  Raises ConfigError
        naming the path and what holds it; nothing on disk is changed then."""
        lock = _PathLock.take(self.path)
        try:
            sock = _bind_claimed(self.path)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)
        except BaseException:
            lock.release(unlink=True)
            raise
        self._lock = lock

    async def close(self) -> None:
        """Stop listening, cancel the clients' tasks and wait for them (they belong to
        this server), then release the path."""
        if self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._inode is not None:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            self._inode = None
        if self._lock is not None:
            self._lock.release(unlink=True)
            self._lock = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # owned by the server: cancelled on close()

        def emit(event: dict[str, Any]) -> None:
            if not writer.is_closing():
                writer.write(json.dumps(event).encode() + b"\n")

        try:
            try:
                line = await reader.readline()
                req = json.loads(line)
                if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                    raise ValueError("expected a JSON object with a string 'cmd'")
            except (ValueError, asyncio.LimitOverrunError) as exc:
                emit({"error": {"message": f"malformed control request: {exc}", "exit_code": 2}})
                return
            handler = self.handlers.get(req["cmd"])
            if handler is None:
                emit(
                    {
                        "error": {
                            "message": f"unknown control command {req['cmd']!r}; known: "
                            f"{', '.join(sorted(self.handlers))}",
                            "exit_code": 2,
                        }
                    }
                )
                return
            try:
                result = await handler(req, emit)
                emit({"result": result})
            except MigratedError as exc:
                emit(
                    {
                        "error": {
                            "message": str(exc),
                            "hint": exc.hint,
                            "exit_code": exc.exit_code,
                            "type": type(exc).__name__,
                        }
                    }
                )
            except Exception as exc:  # a bug in a handler: say so, keep the traceback
                log.exception("control command %r failed", req["cmd"])
                emit(
                    {
                        "error": {
                            "message": f"internal error in {req['cmd']!r}: "
                            f"{type(exc).__name__}: {exc} (a bug in migrated; see the VM "
                            "process's log)",
                            "exit_code": 4,
                        }
                    }
                )
            try:
                await writer.drain()
            except ConnectionError as exc:
                log.info("control client went away before its answer: %s", exc)
        finally:
            self._tasks.discard(task)
            writer.close()


def _holder(pid: int) -> str:
    """``PID 123 (migrated recv --listen ...)``, best effort."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return f"PID {pid}"
    if len(argv) > 2 and argv[1:3] == ["-m", "migrated"]:
        argv = ["migrated", *argv[3:]]
    text = " ".join(argv)
    return f"PID {pid} ({text[:200]})" if text else f"PID {pid}"


def _refuse_path(path: str, why: str) -> ConfigError:
    return ConfigError(
        f"control path {path} {why}",
        hint=f"stop that process first (`migrated stop --control {path}`) or pass another "
        "--control path",
    )


class _PathLock:
    """``PATH.lock``, held with flock by the process that serves ``PATH``."""

    def __init__(self, lock_path: str, fd: int) -> None:
        self.lock_path = lock_path
        self.fd = fd

    @classmethod
    def take(cls, path: str) -> _PathLock:
        lock_path = path + ".lock"
        for _ in range(5):
            try:
                fd = os.open(
                    lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot create the lock file {lock_path} for control socket {path}: "
                    f"{exc.strerror}",
                    hint="check that the directory exists and is writable, or pass another "
                    "--control path",
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    pid_text = _read_pid(fd)
                finally:
                    os.close(fd)
                holder = _holder(int(pid_text)) if pid_text.isdigit() else "another process"
                raise _refuse_path(
                    path, f"is in use: {holder} holds its lock file {lock_path}"
                ) from None
            # A closing server unlinks the lock file: make sure we hold the one in place.
            try:
                here = os.stat(lock_path)
            except FileNotFoundError:
                os.close(fd)
                continue
            mine = os.fstat(fd)
            if (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return cls(lock_path, fd)
        raise _refuse_path(path, f"is contended: its lock file {lock_path} keeps changing")

    def release(self, *, unlink: bool) -> None:
        if self.fd < 0:
            return
        if unlink:  # while still holding it: a waiter then sees the inode change
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)
        os.close(self.fd)
        self.fd = -1


def _read_pid(fd: int) -> str:
    """The PID in a lock file; the holder writes it just after taking the lock."""
    for _ in range(40):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.005)
    return ""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a socket"


def _bind_claimed(path: str) -> socket.socket:
    """With the path's lock held: refuse a non-socket or a live socket, unlink a
    stale one, bind and listen.  Returns the listening socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            f"control path {path} exists and is {_kind(st.st_mode)}, not a socket; "
            "refusing to replace it (it was left untouched)",
            hint="pass a path where the socket can be created, e.g. "
            "/run/migrated/NAME.sock (is --control pointing at the config file?)",
        )
    if st is not None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody listens
        except FileNotFoundError:
            pass  # went away meanwhile
        except OSError as exc:
            raise _refuse_path(
                path, f"is a socket that could not be probed ({exc}); it may be in use"
            ) from exc
        else:
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
            raise _refuse_path(path, f"is in use: {_holder(pid)} listens on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise _refuse_path(path, "appeared while this process was starting") from exc
        raise ConfigError(
            f"cannot create control socket {path}: {exc.strerror or exc}",
            hint="check that the directory exists and is writable and the path is shorter "
            "than 108 bytes, or pass another --control path",
        ) from exc
    finally:
        os.umask(old)
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def stream(path: str, cmd: str, **args: Any) -> AsyncIterator[dict[str, Any]]:
    """Send one request; yield event dicts, then the result dict (``{"result": ...}``).
    Raises ControlError for an error reply, ConfigError when nobody listens."""
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=16 << 20)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ConfigError(
            f"no VM process listens on control socket {path}: {exc.strerror}",
            hint="start one with `migrated run` or `migrated recv`, or check --control",
        ) from exc
    try:
        writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                raise ControlError(
                    f"the VM process closed the control connection during {cmd!r}",
                    hint="check whether the VM process is still alive",
                    exit_code=4,
                )
            msg = json.loads(line)
            if "error" in msg and "event" not in msg:  # events may carry an "error" field
                e = msg["error"]
                raise ControlError(
                    e.get("message", "error"),
                    hint=e.get("hint", ""),
                    exit_code=int(e.get("exit_code", 1)),
                )
            yield msg
            if "result" in msg:
                return
    finally:
        writer.close()


async def request(path: str, cmd: str, **args: Any) -> dict[str, Any]:
    """One request, its result (events are dropped)."""
    async for msg in stream(path, cmd, **args):
        if "result" in msg:
            return dict(msg["result"])
    raise ControlError(f"no result for {cmd!r}", exit_code=4)


class ControlClient:
    """Synchronous convenience wrapper for tests and scripts."""

    def __init__(self, path: str) -> None:
        self.path = path

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        return asyncio.run(request(self.path, cmd, **args))
