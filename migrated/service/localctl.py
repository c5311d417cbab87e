"""The daemon's local control socket, ``/run/migrated/migrated.sock``.

Facts we rely on (unix(7)): ``SO_PEERCRED`` on a connected ``AF_UNIX`` stream socket
returns the pid, uid and gid the peer had when it connected; ``SO_PEERGROUPS``
(Linux 4.13+, option 59) returns its supplementary groups.  The kernel fills both,
so a client cannot lie about them.

Who may use it: root, and members of ``daemon.control_group`` when set (the socket
file is then mode 0660 and owned by that group; otherwise 0600).  Every refused
caller is logged with its uid and pid and gets an error line naming why.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import struct

from migrated.errors import ConfigError

from .lines import Caller, LineHandler, serve_lines

__all__ = ["LocalControl", "peer_credentials"]

log = logging.getLogger(__name__)

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int, tuple[int, ...]]:
    """(pid, uid, gid, supplementary gids) of the process at the other end."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] = ()
    with contextlib.suppress(OSError):
        buf = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
        groups = struct.unpack(f"{len(buf) // 4}I", buf)
    return pid, uid, gid, groups


class LocalControl:
    def __init__(self, path: str, group: str, handlers: dict[str, LineHandler]) -> None:
        self.path = path
        self.handlers = handlers
        self.gid: int | None = None
        if group:
            try:
                self.gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"daemon.control_group: no group named {group!r}") from None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._claim_path()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        old = os.umask(0o177 if self.gid is None else 0o117)
        try:
            self._server = await asyncio.start_unix_server(self._client, self.path)
        finally:
            os.umask(old)
        if self.gid is not None:
            os.chown(self.path, 0, self.gid)

    def _claim_path(self) -> None:
        """A path that is not a socket is refused (never unlinked); a socket with a
        live listener is refused; a stale socket is replaced."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        import stat

        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)  # stale
            return
        finally:
            probe.close()
        raise ConfigError(f"another daemon listens on {self.path}")

    def allowed(self, uid: int, gid: int, groups: tuple[int, ...]) -> bool:
        if uid == 0:
            return True
        return self.gid is not None and (gid == self.gid or self.gid in groups)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, gid, groups = peer_credentials(sock)
        if not self.allowed(uid, gid, groups):
            log.warning("refused control client pid %d uid %d: not root and not in the "
                        "control group", pid, uid)  # fmt: skip
            writer.write(
                b'{"error": {"message": "permission denied: root or daemon.control_group '
                b'only", "exit_code": 2}}\n'
            )
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        await serve_lines(reader, writer, self.handlers, Caller("local", f"uid {uid}", uid, pid))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
