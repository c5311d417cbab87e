"""The control socket of a VM process: JSON lines over a Unix stream socket.

A client sends one request line ``{"cmd": NAME, ...}``.  The server answers with zero
or more event lines ``{"event": ...}`` (long commands such as ``migrate`` stream their
progress) and ends with exactly one line: ``{"result": {...}}`` or
``{"error": {"message": ..., "hint": ..., "exit_code": N}}``, then closes.

Requests are bounded (64 KiB per line); an unknown command or a malformed line is an
error reply naming it.  The socket file is created with mode 0600: whoever can
connect can migrate or stop the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from migrated.errors import ConfigError, MigratedError

__all__ = ["ControlClient", "ControlServer", "Handler", "request", "stream"]

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

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_LINE)
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

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
            except Exception as exc:
                emit({"error": {"message": f"{type(exc).__name__}: {exc}", "exit_code": 4}})
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            self._tasks.discard(task)
            writer.close()


class ControlError(MigratedError):
    """An error reply from a VM process (carries its exit code and hint)."""

    def __init__(self, message: str, *, hint: str = "", exit_code: int = 1) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


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
