"""A deliberately minimal second implementation of the migrated protocol (version 2).

Written from docs/protocol.md alone (it imports nothing of ``migrated``), with blocking
sockets and one thread per connection.  :class:`Destination` receives a whole migration
from a real source and keeps every page in memory; it never runs the guest.
:class:`Source` then hands what it received, VmState byte for byte, on to a real
destination.  Each side checks the spec's rules it is cheap to check and fails with a
:class:`~.wire.PeerError` naming the rule otherwise.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .wire import (
    BULK,
    MAIN,
    MAX_REQUEST_PAGES,
    MIN_VERSION,
    URGENT,
    VERSION,
    Conn,
    Frame,
    Layout,
    PeerError,
    RemoteError,
    checksum_algo,
    connect,
)

HEARTBEAT_PERIOD_S = 0.4  # §9: at least every 1 s
HEARTBEAT_TIMEOUT_S = 5.0  # §9: nothing on MAIN for 5 s is a lost link
HEARTBEAT_STATES = {"setup", "active", "switchover", "device", "ready", "postcopy-active"}
SUPPORTED_FEATURES = ("checksum-xxh3", "checksum-crc32")


class Store:
    """Guest memory as received: one bytearray per region, one flag byte per page."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.memory = [bytearray(nbytes) for _, nbytes, _ in layout.regions]
        self.held = bytearray(layout.total_pages)
        self.nheld = 0

    def _span(self, gpa: int, npages: int) -> tuple[bytearray, int, int, int]:
        region, index = self.layout.locate(gpa, npages)
        start, _, page_size = self.layout.regions[region]
        return self.memory[region], gpa - start, page_size, index

    def install(self, gpa: int, npages: int, data: bytes | None, overwrite: bool) -> int:
        """Write the pages (None: zeros).  ``overwrite`` False installs only pages not
        held (§4 from VmState on).  Returns the number of pages that were not held."""
        mem, off, page_size, index = self._span(gpa, npages)
        new = self.held[index : index + npages].count(0)
        if overwrite or new == npages:
            mem[off : off + npages * page_size] = data or bytes(npages * page_size)
            self.held[index : index + npages] = b"\x01" * npages
        else:
            for i in range(npages):
                if not self.held[index + i]:
                    a = off + i * page_size
                    b = i * page_size
                    mem[a : a + page_size] = data[b : b + page_size] if data else bytes(page_size)
                    self.held[index + i] = 1
        self.nheld += new
        return new

    def drop(self, index: int, npages: int) -> None:
        self.nheld -= self.held[index : index + npages].count(1)
        self.held[index : index + npages] = bytes(npages)

    def read(self, gpa: int, npages: int) -> bytes:
        mem, off, page_size, _ = self._span(gpa, npages)
        return bytes(mem[off : off + npages * page_size])

    def runs(self, max_pages: int, missing_only: bool = False) -> list[tuple[int, int]]:
        """Ranges (gpa, npages) of at most ``max_pages`` covering every page (or every page
        not held), never across regions."""
        out = []
        for (start, nbytes, page_size), first in zip(
            self.layout.regions, self.layout.first_index, strict=True
        ):
            n = nbytes // page_size
            i = 0
            while i < n:
                if missing_only and self.held[first + i]:
                    i += 1
                    continue
                j = i + 1
                while j < n and j - i < max_pages and not (missing_only and self.held[first + j]):
                    j += 1
                out.append((start + i * page_size, j - i))
                i = j
        return out


@dataclass
class Received:
    """What a :class:`Destination` got: enough to be the source of the same VM."""

    vm_name: str = ""
    vm_uuid: str = ""
    layout: Layout | None = None
    vcpu_count: int = 0
    mode: str = ""
    store: Store | None = None
    vmstate: bytes = b""
    features: dict[str, list[str]] = field(default_factory=dict)  # channel -> negotiated
    frames: Counter[str] = field(default_factory=Counter)  # "CHANNEL:Name" -> count
    events: list[str] = field(default_factory=list)  # control frames in arrival order
    requested_pages: int = 0
    pages: Counter[str] = field(default_factory=Counter)  # "CHANNEL:phase" -> pages received
    refused: list[str] = field(default_factory=list)  # Hellos answered with an Error
    answers: list[tuple[int, str, int, int]] = field(default_factory=list)  # id, channel, range


class _Session:
    """State shared by the threads of one side: the §6 state, a failure, the end."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.state = "setup"
        self.failure: BaseException | None = None
        self.done = threading.Event()
        self.main: Conn | None = None
        self.conns: list[Conn] = []

    def fail(self, exc: BaseException, conn: Conn | None) -> None:
        with self.lock:
            if self.failure is None and not self.done.is_set():
                self.failure = exc
                if conn is not None and not isinstance(exc, (RemoteError, OSError)):
                    if isinstance(exc, PeerError):
                        conn.send_error(exc.code, exc.message)
                    else:
                        conn.send_error("internal", f"interop peer: {exc!r}")
                self.state = "failed"
        self.done.set()

    def heartbeat(self, progress: Any) -> None:
        """§9: Progress on MAIN while the session runs."""
        while not self.done.wait(HEARTBEAT_PERIOD_S):
            with self.lock:
                if self.state not in HEARTBEAT_STATES or self.main is None:
                    continue
            try:
                self.main.send("Progress", *progress())
            except OSError as exc:
                self.fail(exc, None)

    def close(self) -> None:
        self.done.set()
        for c in self.conns:
            c.close()


class Destination:
    """Accepts one migration on 127.0.0.1 and stores it.

    ``setup_ack_delay_s`` holds SetupAck back (heartbeats keep going: Progress before
    SetupAck, §6).  ``refuse_bulk`` answers a BULK Hello with an Error (§1: the source
    then pushes on MAIN).  ``requests_before_running`` sends that many PageRequests on
    URGENT as soon as Commit arrives and holds Running back 0.3 s, so the requests
    overtake Running (§1)."""

    def __init__(
        self,
        *,
        setup_ack_delay_s: float = 0.0,
        refuse_bulk: bool = False,
        requests_before_running: int = 0,
    ) -> None:
        self.setup_ack_delay_s = setup_ack_delay_s
        self.refuse_bulk = refuse_bulk
        self.requests_before_running = requests_before_running
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = int(self.listener.getsockname()[1])
        self.s = _Session()
        self.got = Received()
        self.session_id = b""
        self.bytes_received = 0
        self.all_sent = False
        self.running_sent = False
        self.requests: dict[int, tuple[int, int]] = {}
        self.next_request_id = 0
        self.bulk_open = 0
        self.urgent: Conn | None = None
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def wait(self, timeout_s: float) -> Received:
        if not self.s.done.wait(timeout_s):
            self.s.fail(PeerError("timeout", f"no Complete within {timeout_s} s"), self.s.main)
        if self.s.failure is not None:
            raise self.s.failure
        return self.got

    def close(self) -> None:
        self.s.close()
        self.listener.close()
        for t in self.threads:
            t.join(5)

    def _progress(self) -> tuple[int, int]:
        store = self.got.store
        return self.bytes_received, (store.layout.total_pages - store.nheld) if store else 0

    def _accept(self) -> None:
        while not self.s.done.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            t = threading.Thread(target=self._serve, args=(Conn(sock),), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: Conn) -> None:
        self.s.conns.append(conn)
        try:
            self._hello(conn)
        except PeerError as exc:  # §5: refuses this connection only
            self.got.refused.append(str(exc))
            conn.send_error(exc.code, exc.message)
            conn.close()
            return
        except OSError:
            conn.close()
            return
        try:
            while True:
                frame = conn.recv()
                if frame is None:  # §9: clean EOF
                    if conn.channel == BULK or self.s.state in ("completed", "cancelled"):
                        break
                    raise PeerError("protocol", f"{conn.channel_name} closed in {self.s.state}")
                self.got.frames[f"{conn.channel_name}:{frame.name}"] += 1
                self._handle(conn, frame)
        except TimeoutError:
            self.s.fail(PeerError("timeout", "no heartbeat from the source for 5 s"), conn)
        except Exception as exc:
            if not conn.closed:
                self.s.fail(exc, conn)
        finally:
            if conn.channel == BULK:
                with self.s.lock:
                    self.bulk_open -= 1
                    self._request_missing()

    def _hello(self, conn: Conn) -> None:
        frame = conn.recv()
        if frame is None or frame.name != "Hello":
            raise PeerError("unexpected", f"first frame {frame and frame.name}, not Hello")
        version, min_version, role, session_id, features, resume = frame.fields
        if min_version > version:
            raise PeerError("bad-frame", f"empty version range {min_version}..{version}")
        if not max(min_version, MIN_VERSION) <= min(version, VERSION):
            raise PeerError(
                "version",
                f"protocol version mismatch: peer speaks {min_version}..{version}, "
                f"we speak {MIN_VERSION}..{VERSION}",
            )
        if resume or role not in (MAIN, URGENT, BULK):
            raise PeerError("unexpected", f"role {role} resume {resume}: not supported here")
        with self.s.lock:
            state = self.s.state
            if role == MAIN:
                if self.s.main is not None:
                    raise PeerError("busy", "one migration at a time")
                self.s.main = conn
                self.session_id = session_id
            elif session_id != self.session_id:
                raise PeerError("session-unknown", "not this session")
            elif (role == URGENT and state not in {"active", "switchover", "device", "ready",
                                                   "postcopy-active"}) or (
                role == BULK and state not in {"ready", "postcopy-active"}
            ):  # fmt: skip
                raise PeerError("unexpected", f"channel {role} in {state} (§6 OPENING)")
            conn.channel = role
            conn.layout = self.got.layout
            if role == URGENT:
                self.urgent = conn
            if role == BULK:
                if self.refuse_bulk:
                    raise PeerError("unexpected", "this destination takes no BULK connection")
                self.bulk_open += 1
        agreed = [f for f in features if f in SUPPORTED_FEATURES]
        conn.algo = checksum_algo(agreed)
        self.got.features[conn.channel_name] = agreed
        conn.send("Welcome", min(version, VERSION), agreed, session_id)
        if role == MAIN:
            conn.sock.settimeout(HEARTBEAT_TIMEOUT_S)
            conn.send("Progress", *self._progress())  # before Setup and SetupAck, on purpose
            t = threading.Thread(target=self.s.heartbeat, args=(self._progress,), daemon=True)
            self.threads.append(t)
            t.start()

    def _handle(self, conn: Conn, f: Frame) -> None:
        name, s = f.name, self.s
        if name == "Progress":
            return
        if name == "Error":
            raise RemoteError(*f.fields)
        if name not in ("Pages", "ZeroPages"):
            self.got.events.append(f"{conn.channel_name}:{name}")
            if conn.channel != MAIN:
                raise PeerError("unexpected", f"{name} on {conn.channel_name}")
        with s.lock:
            if name in ("Pages", "ZeroPages"):
                if s.state not in {"active", "switchover", "ready", "postcopy-active",
                                   "completed"}:  # fmt: skip
                    raise PeerError("unexpected", f"{name} in {s.state}")
                if conn.channel != MAIN and s.state in ("active", "switchover"):
                    raise PeerError("unexpected", f"{name} on {conn.channel_name} before Commit")
                gpa, npages, request_id = f.fields[:3]
                if self.requests.pop(request_id, None) is not None:
                    self.got.answers.append((request_id, conn.channel_name, gpa, npages))
                    self.got.events.append(f"{conn.channel_name}:answer {request_id}")
                self.bytes_received += len(f.payload)
                phase = "before-commit" if s.state in ("active", "switchover") else "after-commit"
                self.got.pages[f"{conn.channel_name}:{phase}"] += npages
                assert self.got.store is not None
                self.got.store.install(
                    gpa, npages, f.payload or None, s.state in ("active", "switchover")
                )
                self._maybe_complete()
            elif name == "Setup" and s.state == "setup":
                vm_name, vm_uuid, regions, vcpus, mode = f.fields
                if mode not in ("postcopy", "hybrid", "precopy"):
                    raise PeerError("bad-frame", f"mode {mode!r}")
                layout = Layout(regions)
                self.got.vm_name, self.got.vm_uuid, self.got.layout = vm_name, vm_uuid, layout
                self.got.vcpu_count, self.got.mode = vcpus, mode
                self.got.store = Store(layout)
                conn.layout = layout
            elif name in ("Discard", "DiscardBitmap") and s.state in ("active", "switchover"):
                assert self.got.store is not None and self.got.layout is not None
                if name == "Discard":
                    self.got.store.drop(self.got.layout.locate(*f.fields)[1], f.fields[1])
                else:
                    total = self.got.layout.total_pages
                    for byte_index, byte in enumerate(f.payload):
                        for bit in range(8) if byte else ():
                            if byte >> bit & 1:
                                if byte_index * 8 + bit >= total:
                                    raise PeerError("protocol", "DiscardBitmap bit past the end")
                                self.got.store.drop(byte_index * 8 + bit, 1)
            elif name == "PrecopyRoundEnd" and s.state == "active":
                conn.send("PrecopyRoundAck", f.fields[0], self.bytes_received)
            elif name == "Switchover" and s.state == "active":
                s.state = "switchover"
            elif name == "VmState" and s.state == "switchover":
                s.state = "device"
                self.got.vmstate = f.payload
                try:
                    record = msgpack.unpackb(f.payload, raw=False)
                except Exception:
                    record = None
                if not isinstance(record, dict) or (record.get("magic"), record.get("version")) != (
                    "migrated-vmstate",
                    1,
                ):
                    raise PeerError("restore-failed", "not a version-1 migrated-vmstate record")
                conn.send("Ready")
                s.state = "ready"
            elif name == "Commit" and s.state == "ready":
                s.state = "postcopy-active"
                if not self.requests_before_running:
                    self._send_running(conn)
            elif name == "AllSent" and s.state in ("postcopy-active", "completed"):
                self.all_sent = True
                self._request_missing()
            elif name == "CompleteAck" and s.state == "completed":
                s.done.set()
            elif name == "Cancel" and s.state not in ("postcopy-active", "completed"):
                s.state = "cancelled"  # not an error to answer: the session just ends
                raise RemoteError("cancelled", f"the source cancelled: {f.fields[0]}")
            else:
                code = "cancel-refused" if name == "Cancel" else "unexpected"
                raise PeerError(code, f"{name} in {s.state} (§6)")
        # The delays happen outside the lock: the heartbeat and the other connections
        # keep going meanwhile.
        if name == "Setup":
            time.sleep(self.setup_ack_delay_s)
            with s.lock:
                s.state = "active"
                conn.send("SetupAck")
        if name == "Commit" and self.requests_before_running:
            with s.lock:
                self._request(self.requests_before_running)
                self.got.events.append("requests sent before Running")
            time.sleep(0.3)
            with s.lock:
                self._send_running(conn)

    def _send_running(self, conn: Conn) -> None:
        conn.send("Running")
        self.got.events.append("Running sent")
        self.running_sent = True
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        """Complete once every page is held; on MAIN after Running, never before it."""
        store = self.got.store
        if (
            self.s.state == "postcopy-active"
            and self.running_sent
            and store
            and store.nheld == store.layout.total_pages
        ):
            assert self.s.main is not None
            # The state changes first: once Complete is out, the source may close URGENT
            # and BULK at once, and their readers must find the session completed.
            self.s.state = "completed"
            self.s.main.send("Complete", store.nheld)

    def _request_missing(self) -> None:
        """After AllSent and once every BULK connection ended, ask for what is still
        missing."""
        if self.all_sent and not self.bulk_open and self.s.state == "postcopy-active":
            self._request(None)

    def _request(self, limit: int | None) -> None:
        """PageRequests on URGENT (MAIN without one) for up to ``limit`` missing runs."""
        assert self.got.store is not None
        conn = self.urgent or self.s.main
        assert conn is not None
        runs = self.got.store.runs(MAX_REQUEST_PAGES, missing_only=True)
        for gpa, npages in runs[:limit]:
            if (gpa, npages) in self.requests.values():
                continue
            self.next_request_id += 1
            self.requests[self.next_request_id] = (gpa, npages)
            self.got.requested_pages += npages
            conn.send("PageRequest", self.next_request_id, gpa, npages)


class Source:
    """Sends ``got`` (from a :class:`Destination`) to a real destination at ``addr``, in
    postcopy mode: Switchover at once, VmState, Commit on Ready, then every page.

    ``bulk_before_commit`` opens BULK and writes that many frames on it before Commit's
    bytes are written to MAIN, so they overtake Commit (§1).  ``urgent`` False opens no
    URGENT connection (requests then come on MAIN, §4); ``bulk`` False pushes on MAIN.
    ``stale_resends`` slips into the push frames that claim pages the destination holds
    already (zeros, and garbage): §4 says they are ignored, the guest's verify proves
    it.  ``push_delay_s`` waits that long after Commit before pushing, so the guest
    surely faults and its requests are served first."""

    def __init__(
        self,
        addr: tuple[str, int],
        got: Received,
        *,
        features: tuple[str, ...] = ("checksum-xxh3",),
        frame_pages: int = 256,
        bulk_before_commit: int = 0,
        urgent: bool = True,
        bulk: bool = True,
        stale_resends: bool = False,
        push_delay_s: float = 0.0,
    ) -> None:
        assert got.store is not None and got.layout is not None
        self.addr, self.got, self.store = addr, got, got.store
        self.features = list(features)
        self.frame_pages = frame_pages
        self.bulk_before_commit = bulk_before_commit
        self.urgent, self.bulk = urgent, bulk
        self.stale_resends = stale_resends
        self.push_delay_s = push_delay_s
        self.session_id = os.urandom(16)
        self.s = _Session()
        self.inbox: queue.Queue[Frame | BaseException] = queue.Queue()
        self.bytes_sent = 0
        self.pages_pushed = 0
        self.requests_answered = 0
        self.running_seen = False
        self.bulk_refused: RemoteError | None = None
        self.stale_sent = 0
        self.welcomes: dict[str, list[str]] = {}
        self.threads: list[threading.Thread] = []

    def _progress(self) -> tuple[int, int]:
        return self.bytes_sent, max(0, self.store.layout.total_pages - self.pages_pushed)

    def _open(self, channel: int) -> Conn:
        conn = Conn(connect(self.addr), channel)
        conn.layout = self.got.layout
        self.s.conns.append(conn)
        conn.send("Hello", VERSION, MIN_VERSION, channel, self.session_id, self.features, False)
        frame = conn.recv()
        if frame is None:
            raise PeerError("protocol", f"{conn.channel_name} closed before Welcome")
        if frame.name == "Error":
            raise RemoteError(*frame.fields)
        if frame.name != "Welcome":
            raise PeerError("unexpected", f"{frame.name} answering Hello")
        version, agreed, session_id = frame.fields
        if not MIN_VERSION <= version <= VERSION or session_id != self.session_id:
            raise PeerError("protocol", f"Welcome {frame.fields!r}")
        if not set(agreed) <= set(self.features):
            raise PeerError("feature", f"Welcome accepted {agreed}, offered {self.features}")
        conn.algo = checksum_algo(agreed)
        self.welcomes[conn.channel_name] = agreed
        if channel != BULK:
            t = threading.Thread(target=self._reader, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()
        return conn

    def _reader(self, conn: Conn) -> None:
        """MAIN: control frames to the inbox; MAIN or URGENT: answer PageRequests."""
        if conn.channel == MAIN:
            conn.sock.settimeout(HEARTBEAT_TIMEOUT_S)
        try:
            while True:
                frame = conn.recv()
                if frame is None:
                    if self.s.state == "completed" or conn.closed:
                        return
                    raise PeerError("protocol", f"{conn.channel_name} closed in {self.s.state}")
                if frame.name == "Progress":
                    continue
                if frame.name == "PageRequest":
                    if self.s.state not in ("postcopy-active", "completed"):
                        raise PeerError("unexpected", f"PageRequest in {self.s.state}")
                    self._answer(conn, *frame.fields)
                elif frame.name == "Running" and conn.channel == MAIN:
                    self.running_seen = True
                elif conn.channel == MAIN or frame.name == "Error":
                    self.inbox.put(frame)
                else:
                    raise PeerError("unexpected", f"{frame.name} on {conn.channel_name}")
        except TimeoutError:
            if not conn.closed:
                self.inbox.put(PeerError("timeout", "no heartbeat from the destination for 5 s"))
        except Exception as exc:
            if not conn.closed:
                if isinstance(exc, PeerError) and not isinstance(exc, RemoteError):
                    conn.send_error(exc.code, exc.message)
                elif not isinstance(exc, OSError):
                    conn.send_error("internal", f"interop peer: {exc!r}")
                self.inbox.put(exc)

    def _answer(self, conn: Conn, request_id: int, gpa: int, npages: int) -> None:
        self.requests_answered += 1
        self._send_pages(conn, gpa, npages, request_id)

    def _send_pages(self, conn: Conn, gpa: int, npages: int, request_id: int = 0) -> None:
        data = self.store.read(gpa, npages)
        if data.count(0) == len(data):
            conn.send("ZeroPages", gpa, npages, request_id)
        else:
            conn.send_checked("Pages", gpa, npages, request_id, payload=data, seed=gpa)
            self.bytes_sent += len(data)

    def _expect(self, name: str, timeout_s: float) -> Frame:
        try:
            item = self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            raise PeerError("timeout", f"no {name} within {timeout_s} s") from None
        if isinstance(item, BaseException):
            raise item
        if item.name == "Error":
            raise RemoteError(*item.fields)
        if item.name != name:
            raise PeerError("unexpected", f"{item.name} while waiting for {name}")
        return item

    def run(self, timeout_s: float = 60.0) -> None:
        got = self.got
        assert got.layout is not None
        main = self._open(MAIN)
        self.s.main = main
        t = threading.Thread(target=self.s.heartbeat, args=(self._progress,), daemon=True)
        self.threads.append(t)
        t.start()
        regions = [list(r) for r in got.layout.regions]
        main.send("Setup", got.vm_name, got.vm_uuid, regions, got.vcpu_count, "postcopy")
        main.send("Progress", *self._progress())  # before SetupAck, on purpose
        self._expect("SetupAck", 10)
        self.s.state = "active"
        if self.urgent:
            self._open(URGENT)
        main.send("Switchover")
        self.s.state = "switchover"
        # Postcopy: no page has to be resident before VmState (§4 Switchover: "the final
        # Discards ... and then exactly one VmState").
        main.send_checked("VmState", len(got.vmstate), payload=got.vmstate)
        self.s.state = "device"
        self._expect("Ready", 30)
        runs = self.store.runs(self.frame_pages)
        # The point of no return: from here on Commit is sent, whatever happens.
        self.s.state = "postcopy-active"
        if self.bulk_before_commit:
            bulk: Conn | None = self._open(BULK)
            for gpa, npages in runs[: self.bulk_before_commit]:
                self._send_pages(bulk, gpa, npages)
                self.pages_pushed += npages
            runs = runs[self.bulk_before_commit :]
            main.send("Commit")
        else:
            main.send("Commit")
            bulk = None
            if self.bulk:
                try:
                    bulk = self._open(BULK)
                except RemoteError as exc:  # §1: a destination MAY refuse BULK: use MAIN
                    self.bulk_refused = exc
        push = bulk or main
        time.sleep(self.push_delay_s)
        stale_after = self._stale_ranges()[-1] if self.stale_resends else None
        for gpa, npages in runs:
            if stale_after is not None and gpa >= stale_after[0] + stale_after[1] * 4096:
                # Mid-push, while the destination still misses the rest: sent at the end,
                # they could find it completed, and it may close BULK once completed.
                self._resend_stale(push)
                stale_after = None
            self._send_pages(push, gpa, npages)
            self.pages_pushed += npages
        if bulk is not None:
            bulk.close()  # §1: the clean end of a BULK connection
        main.send("AllSent")
        self._expect("Complete", timeout_s)
        self.s.state = "completed"
        main.send("CompleteAck")

    def _stale_ranges(self) -> list[tuple[int, int]]:
        """The page tables at GPA 0x10000 (the guest triple-faults if they are zeroed),
        and two runs of guest data in the middle of region 0 (4 KiB pages)."""
        start, nbytes, page_size = self.store.layout.regions[0]
        assert page_size == 4096
        middle = start + nbytes // 2
        return [(start + 0x10000, 2), (middle, 16), (middle + 16 * page_size, 16)]

    def _resend_stale(self, conn: Conn) -> None:
        """Frames over pages already sent on this same ordered connection, so they reach
        the destination after the true ones: zeros over the page tables and the first
        data run, Pages of 0xA5 bytes over the second."""
        (tables, n_tables), (zeros, n_zeros), (junk, n_junk) = self._stale_ranges()
        conn.send("ZeroPages", tables, n_tables, 0)
        conn.send("ZeroPages", zeros, n_zeros, 0)
        conn.send_checked("Pages", junk, n_junk, 0, payload=b"\xa5" * (n_junk * 4096), seed=junk)
        self.stale_sent = n_tables + n_zeros + n_junk

    def close(self) -> None:
        self.s.close()
        for t in self.threads:
            with contextlib.suppress(RuntimeError):
                t.join(5)
