"""JSON lines over any stream: the wire of the daemon's two control connections.

The same conversation as a VM process' control socket (:mod:`.control`): one request
line ``{"cmd": NAME, ...}``; zero or more event lines ``{"event": ...}``; then exactly
one ``{"result": {...}}`` or ``{"error": {"message", "hint", "exit_code"}}``; close.
Here the handler also gets the caller (a :class:`Caller`: the Unix credentials of a
local client, or the certificate identity of a peer daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from migrated.errors import ControlError, MigratedError

__all__ = ["Caller", "LineHandler", "exchange", "serve_lines"]

log = logging.getLogger(__name__)

MAX_LINE = 1 << 16
Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Caller:
    """Who sent a request: ``kind`` is ``local`` (uid/gid/pid from SO_PEERCRED) or
    ``peer`` (``identity``: the names in its certificate, or its address in plain mode)."""

    kind: str
    identity: str
    uid: int = -1
    pid: int = 0


LineHandler = Callable[[dict[str, Any], Emit, Caller], Awaitable[dict[str, Any]]]


async def serve_lines(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handlers: dict[str, LineHandler],
    caller: Caller,
) -> None:
    """Answer one request on this connection, then close it."""

    def emit(event: dict[str, Any]) -> None:
        if not writer.is_closing():
            writer.write(json.dumps(event).encode() + b"\n")

    try:
        try:
            line = await reader.readline()
            if not line:
                return
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("expected a JSON object with a string 'cmd'")
        except (ValueError, asyncio.LimitOverrunError) as exc:
            emit({"error": {"message": f"malformed request: {exc}", "exit_code": 2}})
            return
        handler = handlers.get(req["cmd"])
        if handler is None:
            known = ", ".join(sorted(handlers))
            emit({"error": {"message": f"unknown command {req['cmd']!r}; known: {known}",
                            "exit_code": 2}})  # fmt: skip
            return
        try:
            emit({"result": await handler(req, emit, caller)})
        except MigratedError as exc:
            emit({"error": {"message": str(exc), "hint": exc.hint, "exit_code": exc.exit_code,
                            "type": type(exc).__name__}})  # fmt: skip
        except Exception as exc:
            log.exception("command %s from %s failed", req["cmd"], caller.identity)
            emit({"error": {"message": f"{type(exc).__name__}: {exc}", "exit_code": 4}})
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cmd: str, **args: Any
) -> AsyncIterator[dict[str, Any]]:
    """Client side: send one request; yield events, then the ``{"result": ...}`` line.
    Raises :class:`ControlError` for an error reply or a connection closed early."""
    try:
        writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                raise ControlError(
                    f"the other end closed the connection during {cmd!r}", exit_code=4
                )
            msg = json.loads(line)
            if "error" in msg and "event" not in msg:
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
