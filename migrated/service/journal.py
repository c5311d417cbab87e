"""Logging for the service: journald's native protocol under systemd, plain lines otherwise.

Facts we rely on (systemd-journald.socket(8), the "Native Journal Protocol" document):

* journald reads datagrams on ``/run/systemd/journal/socket``.  A datagram is a list
  of fields: ``NAME=value\\n`` when the value has no newline, otherwise ``NAME\\n``, the
  value's length as a little-endian 64-bit integer, the value and ``\\n``.  Field
  names are upper case letters, digits and underscores, not starting with ``_``.
* A datagram larger than the socket allows (``EMSGSIZE``) is sent instead as a sealed
  memfd passed with ``SCM_RIGHTS`` in an empty datagram.
* systemd sets ``$JOURNAL_STREAM`` to ``DEVICE:INODE`` of the stream it connected to
  our stderr; when stderr is still that stream, our output goes to the journal and
  the native protocol can carry the structured fields instead.

The record attributes of :mod:`migrated.log` become fields: ``migrated_vm`` →
``MIGRATED_VM``, ``migrated_session`` → ``MIGRATED_SESSION``, ``migrated_phase`` →
``MIGRATED_PHASE``, ``migrated_event`` → ``MIGRATED_EVENT`` and ``MESSAGE_ID`` (from
:data:`migrated.log.EVENT_MESSAGE_IDS`), so ``journalctl MESSAGE_ID=...`` finds every
completed migration.  journald sets ``_PID``, ``_SYSTEMD_UNIT`` etc. itself.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import sys
from typing import Any

from migrated.log import EVENT_MESSAGE_IDS

__all__ = [
    "JOURNAL_SOCKET",
    "JournalHandler",
    "StderrFormatter",
    "encode_fields",
    "journal_wanted",
    "setup_logging",
]

JOURNAL_SOCKET = "/run/systemd/journal/socket"

#: record attribute -> journal field
CONTEXT_FIELDS = {
    "migrated_vm": "MIGRATED_VM",
    "migrated_session": "MIGRATED_SESSION",
    "migrated_phase": "MIGRATED_PHASE",
    "migrated_event": "MIGRATED_EVENT",
}

_PRIORITY = {  # syslog priorities
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _priority(levelno: int) -> int:
    for level, prio in _PRIORITY.items():
        if levelno >= level:
            return prio
    return 7


def encode_fields(fields: dict[str, str]) -> bytes:
    """The native protocol's encoding of one entry (see the module notes)."""
    out = bytearray()
    for name, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def record_fields(record: logging.LogRecord, message: str, identifier: str) -> dict[str, str]:
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(_priority(record.levelno)),
        "SYSLOG_IDENTIFIER": identifier,
        "LOGGER": record.name,
        "CODE_FILE": record.pathname,
        "CODE_LINE": str(record.lineno),
        "CODE_FUNC": record.funcName,
    }
    for attr, field in CONTEXT_FIELDS.items():
        value = getattr(record, attr, None)
        if value is not None and value != "":
            fields[field] = str(value)
    event = getattr(record, "migrated_event", None)
    if event in EVENT_MESSAGE_IDS:
        fields["MESSAGE_ID"] = EVENT_MESSAGE_IDS[event]
    return fields


class JournalHandler(logging.Handler):
    """Sends each record to journald as one structured entry.  A failure to send is
    reported once on stderr and the record is written there instead."""

    def __init__(self, identifier: str = "migrated", socket_path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._fallback = logging.StreamHandler(sys.stderr)
        self._fallback.setFormatter(StderrFormatter())
        self._warned = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            data = encode_fields(record_fields(record, message, self.identifier))
            self._send(data)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                sys.stderr.write(f"migrated: journald unreachable ({exc}); logging to stderr\n")
            self._fallback.emit(record)
        except Exception:
            self.handleError(record)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendto(data, self.socket_path)
        except OSError as exc:
            if exc.errno not in (90, 105):  # EMSGSIZE, ENOBUFS: too big for a datagram
                raise
            fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.write(fd, data)
                fcntl.fcntl(
                    fd,
                    fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE
                    | fcntl.F_SEAL_SEAL,
                )
                rights = struct.pack("i", fd)
                self._sock.sendmsg(
                    [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self.socket_path
                )
            finally:
                os.close(fd)

    def close(self) -> None:
        self._sock.close()
        super().close()


class StderrFormatter(logging.Formatter):
    """``migrated: LEVEL [vm=web1 session=ab12 phase=active] message`` (no timestamp:
    journald or the terminal adds one)."""

    def format(self, record: logging.LogRecord) -> str:
        ctx = []
        for attr, key in (
            ("migrated_vm", "vm"),
            ("migrated_session", "session"),
            ("migrated_phase", "phase"),
            ("migrated_event", "event"),
        ):
            value = getattr(record, attr, None)
            if value:
                ctx.append(f"{key}={value}")
        prefix = f"migrated: {record.levelname.lower()}"
        if ctx:
            prefix += " [" + " ".join(ctx) + "]"
        text = f"{prefix} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def journal_wanted(environ: Any = None) -> bool:
    """True when stderr is the journal stream systemd gave us (``$JOURNAL_STREAM``)
    and journald's socket exists."""
    env = os.environ if environ is None else environ
    stream = env.get("JOURNAL_STREAM", "")
    if not stream or not os.path.exists(JOURNAL_SOCKET):
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str | int = "info", target: str = "auto") -> logging.Handler:
    """Configure the root logger once for a service process.  ``target``: ``auto``
    (journal when :func:`journal_wanted`, else stderr), ``journal`` or ``stderr``.
    Returns the installed handler."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError(f"unknown log level {level!r}")
    use_journal = target == "journal" or (target == "auto" and journal_wanted())
    handler: logging.Handler
    if use_journal:
        handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
