"""The sd_notify protocol: readiness, status, watchdog and stopping, told to systemd.

Facts we rely on (sd_notify(3), systemd.service(5)):

* systemd passes ``$NOTIFY_SOCKET`` to a ``Type=notify`` service: a path of an
  ``AF_UNIX`` datagram socket, or an abstract one when it starts with ``@``.  One
  datagram carries newline-separated ``KEY=VALUE`` assignments.
* ``READY=1`` moves the unit from ``activating`` to ``active``; ``systemctl start``
  waits for it.  ``STATUS=`` is free text shown by ``systemctl status``.
  ``STOPPING=1`` says shutdown began.  ``WATCHDOG=1`` must arrive more often than
  ``WatchdogSec=``; systemd passes that period as ``$WATCHDOG_USEC`` (and the pid it
  is meant for as ``$WATCHDOG_PID``), and kills the service (SIGABRT) when a ping is
  late.  The convention is to ping at half the period.
* With ``NotifyAccess=main`` only the main process may notify.

We write this ourselves instead of using a library: it is one ``sendto`` of a few
bytes, the candidates on PyPI are either unmaintained (``sdnotify``, last release
2017) or need libsystemd and a compiler (``systemd-python``), and the daemon must
run (without notifying) where systemd is absent.  Without ``$NOTIFY_SOCKET`` every
call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Talks to systemd when started by it, does nothing otherwise.

    ``Notifier.from_environment()`` reads ``$NOTIFY_SOCKET`` and the watchdog
    variables once, at start.  Sending never raises: a lost notification must not stop
    a VM; the first failure is logged as a warning."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False
        self.last_status = ""

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = 0
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            usec = int(env["WATCHDOG_USEC"])
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping (half of ``WatchdogSec=``), or None without a watchdog."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (keyword names are upper-cased).  True when sent."""
        if self.address is None:
            return False
        text = "".join(f"{k.upper()}={v}\n" for k, v in fields.items())
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(text.encode(), addr)
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._warned = True
            return False

    def ready(self, status: str | None = None) -> None:
        fields: dict[str, str | int] = {"ready": 1}
        if status is not None:
            fields["status"] = status
            self.last_status = status
        self.send(**fields)

    def status(self, text: str) -> None:
        """Send ``STATUS=`` when it changed (one line; newlines are flattened)."""
        text = " ".join(text.split())
        if text != self.last_status:
            self.last_status = text
            self.send(status=text)

    def stopping(self, status: str | None = None) -> None:
        fields: dict[str, str | int] = {"stopping": 1}
        if status is not None:
            fields["status"] = status
        self.send(**fields)

    def watchdog(self) -> None:
        self.send(watchdog=1)

    async def watchdog_loop(self) -> None:
        """Ping at half the watchdog period until cancelled.  It runs on the event
        loop on purpose: a stalled loop stops the pings and systemd restarts us."""
        interval = self.watchdog_interval_s
        if interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
