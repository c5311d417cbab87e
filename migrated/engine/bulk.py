"""The postcopy background push on its own TCP connection (BULK) and threads.

Facts we rely on:

* Bulk traffic is what delays urgent work.  On an event loop a fault waits for the
  bulk frame in progress, on both sides; on two cores the loops are also busy, so
  the kernel has no idle thread to wake for a fault.  So after the guest runs on the
  destination, the push leaves MAIN: the source pushes from a thread
  (:class:`BulkPusher`) over a BULK connection, and the destination receives and
  installs from a thread (:class:`BulkReceiver`).  Both loops keep control, faults
  and urgent pages, and sleep between them.
* Ordering: the push starts only after ``Running``, when every Discard and the
  VmState are behind us on MAIN, and postcopy copies of a page are all identical
  (the source VM is paused).  So BULK needs no ordering with MAIN or URGENT.
* Both threads use blocking sockets with their own sans-IO :class:`Connection`; the
  GIL is released inside every send, recv and UFFDIO_COPY.  Shared state is the
  source's sent bitmap (guarded by a lock shared with the urgent path) and the
  destination's received bitmap (guarded by :class:`PageInstaller`'s lock).
* The destination accepts BULK on its asyncio server, then detaches it: a dup of the
  socket goes to the thread and the transport is closed (the dup keeps TCP up).  The
  socket stays non-blocking underneath (flags are shared between dups); the thread
  uses Python's timeout mode, which polls.  The thread starts only after the channel
  stopped touching the connection (``Channel.detach``): one stream decoded by two
  owners once installed a page from a staging buffer that was being refilled.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from migrated.errors import ProtocolError, RemoteProtocolError
from migrated.kernel import PageBitmap
from migrated.protocol import (
    NEED_DATA,
    ConnectionClosed,
    Error,
    Hello,
    Pages,
    Progress,
    Role,
    Welcome,
    ZeroPages,
)
from migrated.protocol.connection import Connection

from .channel import tune_socket
from .installer import PageInstaller
from .ram import PAGE_SIZE, GuestRam, staging_buffer
from .stats import Pacer

__all__ = ["BulkPusher", "BulkReceiver"]

_RECV_NBYTES = 1 << 20
_IDLE_TIMEOUT_S = 30.0  # a silent BULK socket: let the MAIN heartbeat decide


def _sendall(sock: socket.socket, bufs: list[Any]) -> int:
    """sendmsg until every buffer went out; returns the bytes sent."""
    views = [memoryview(b).cast("B") for b in bufs]
    total = sum(v.nbytes for v in views)
    while views:
        n = sock.sendmsg(views)
        while n:
            if n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
    return total


class BulkPusher:
    """Source side: pushes every page not yet sent, from a thread.

    ``sent`` and ``lock`` are shared with the urgent path, which marks what it sends
    and asks for a :meth:`jump` (locality).  ``on_done(exc)`` runs on the loop when
    the push finished (``exc`` None) or failed.
    """

    def __init__(
        self,
        *,
        ram: GuestRam,
        sent: PageBitmap,
        lock: threading.Lock,
        hello: Hello,
        host: str,
        port: int,
        frame_pages: int,
        bandwidth_bytes_per_s: int,
        connect_timeout_s: float,
        on_done: Callable[[BaseException | None], None],
    ) -> None:
        self.ram, self.sent, self.lock = ram, sent, lock
        self.hello, self.host, self.port = hello, host, port
        self.frame_pages = frame_pages
        self.bandwidth = bandwidth_bytes_per_s
        self.connect_timeout_s = connect_timeout_s
        self.bytes_sent = 0
        self.normal_pages = 0
        self.zero_pages = 0
        self._on_done = on_done
        self._loop = asyncio.get_running_loop()
        self._jump_to: int | None = None
        self._stop = False
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="migrated-push", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def jump(self, page: int) -> None:
        self._jump_to = page  # read by the push thread; an int store is atomic

    def stop(self) -> None:
        """Stop pushing (idempotent); the thread ends without calling on_done."""
        self._stop = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout_s: float = 5.0) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        failure: BaseException | None = None
        try:
            self._push()
        except BaseException as exc:
            failure = exc
        finally:
            if self._sock is not None:
                self._sock.close()
        if not self._stop:
            with contextlib.suppress(RuntimeError):  # loop closed: the process is ending
                self._loop.call_soon_threadsafe(self._on_done, failure)

    def _connect(self) -> tuple[socket.socket, Connection]:
        sock = socket.create_connection((self.host, self.port), self.connect_timeout_s)
        self._sock = sock
        tune_socket(sock, bulk=True)
        conn = Connection(
            Role.SOURCE,
            self.hello.role,
            layout=self.ram.layout,
            max_frame_payload=self.frame_pages * PAGE_SIZE,
        )
        _sendall(sock, conn.send(self.hello))
        buf = bytearray(4096)
        while True:
            n = sock.recv_into(buf)
            conn.receive_data(bytes(buf[:n]) if n else b"")
            ev = conn.next_event()
            if ev is NEED_DATA:
                continue
            if isinstance(ev, Welcome):
                sock.settimeout(None)
                return sock, conn
            if isinstance(ev, Error):
                raise ProtocolError(
                    f"the destination refused the BULK connection: {ev.message}", code=ev.code
                )
            raise RemoteProtocolError(f"unexpected {type(ev).__name__} on BULK")

    def _push(self) -> None:
        sock, conn = self._connect()
        scratch = PageBitmap(self.frame_pages)
        cursor, wrapped = 0, False
        pacer = Pacer(self.bandwidth)
        while not self._stop:
            with self.lock:
                if self._jump_to is not None:
                    cursor, self._jump_to, wrapped = self._jump_to, None, False
                page, n = self.sent.find_run(cursor, False, self.frame_pages)
                if page >= 0:
                    self.sent.set(page, n)
            if page < 0:
                if wrapped or cursor == 0:
                    return
                cursor, wrapped = 0, True
                continue
            cursor = page + n
            sent = 0
            for frame in self.ram.frames(page, n, self.frame_pages, scratch):
                _sendall(sock, conn.send(frame))
                if isinstance(frame, ZeroPages):
                    self.zero_pages += frame.npages
                else:
                    self.normal_pages += frame.npages
                    sent += frame.npages * PAGE_SIZE
            self.bytes_sent += sent
            delay_s = pacer.delay_s(sent)
            if delay_s:
                time.sleep(delay_s)


class BulkReceiver:
    """Destination side: receives BULK frames and installs them, on one thread.

    Receiving and installing run in series here.  Overlapping them on two threads
    measured slower on the two-core hosts this project is tested on (1.7 s against
    1.45 s for 2 GiB, and twice the fault latency): a third busy thread competes with
    the source's push for the same cores.  ``on_installed(runs)`` and
    ``on_closed(exc)`` run on the loop.
    """

    def __init__(
        self,
        fd: int,
        conn: Connection,
        installer: PageInstaller,
        ram: GuestRam,
        max_frame_nbytes: int,
        on_installed: Callable[[list[tuple[int, int]]], None],
        on_closed: Callable[[BaseException | None], None],
    ) -> None:
        self.conn, self.installer, self.ram = conn, installer, ram
        self._on_installed = on_installed
        self.bytes_received = 0
        self.normal_pages = 0
        self.zero_pages = 0
        self._sock = socket.socket(fileno=fd)
        self._staging = staging_buffer(max_frame_nbytes)
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="migrated-bulk", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout_s: float = 5.0) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _sink(self, header: Any) -> memoryview | None:
        if isinstance(header, Pages):
            return self._staging[: header.npages * PAGE_SIZE]
        return None

    def _run(self) -> None:
        failure: BaseException | None = None
        try:
            self._receive()
        except BaseException as exc:
            failure = exc
        finally:
            self._sock.close()
        if not self._stop:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._on_closed, failure)

    def _receive(self) -> None:
        sock, conn = self._sock, self.conn
        sock.settimeout(_IDLE_TIMEOUT_S)  # polls: the fd stays non-blocking (shared flags)
        conn.set_payload_sink(self._sink)
        scratch = memoryview(bytearray(_RECV_NBYTES))
        while not self._stop:
            target = conn.payload_target()
            try:
                if target is not None:
                    n = sock.recv_into(target, min(len(target), _RECV_NBYTES))
                    if n:
                        conn.payload_written(n)
                else:
                    n = sock.recv_into(scratch)
                    conn.receive_data(scratch[:n] if n else b"")
            except TimeoutError:
                continue
            if n == 0 and target is not None:
                conn.receive_data(b"")
            self.bytes_received += n
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, ConnectionClosed):
                    return
                if isinstance(ev, Pages | ZeroPages):
                    page = self.ram.page_of_gpa(ev.gpa)
                    data = ev.data if isinstance(ev, Pages) else None
                    runs = self.installer.install(page, ev.npages, data)
                    if data is None:
                        self.zero_pages += ev.npages
                    else:
                        self.normal_pages += ev.npages
                    self._loop.call_soon_threadsafe(self._on_installed, runs)
                elif isinstance(ev, Error):
                    raise ProtocolError(f"the source reported on BULK: {ev.message}", code=ev.code)
                elif not isinstance(ev, Progress):
                    raise RemoteProtocolError(f"unexpected {type(ev).__name__} on BULK")
            if n == 0:
                return
