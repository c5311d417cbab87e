"""The wire format of docs/protocol.md (version 2), written from that document alone.

Nothing here imports ``migrated``: this is the independent reading of §2 (framing),
§3 (layout and page ranges), §4 (the message table) and §8 (checksums) that the
interoperability peer (peer.py) speaks.  Blocking sockets, one frame at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

VERSION = 2
MIN_VERSION = 2
MAIN, URGENT, BULK = 0, 1, 2
CHANNEL_NAMES = {MAIN: "MAIN", URGENT: "URGENT", BULK: "BULK"}
MAX_HEADER = 65536  # §2
MAX_VMSTATE = 64 << 20  # §4
MAX_REQUEST_PAGES = 512  # §4 PageRequest

# §4: name -> (type code, the kinds of the header fields after the code).
MESSAGES: dict[str, tuple[int, tuple[str, ...]]] = {
    "Hello": (1, ("uint", "uint", "uint", "bin16", "features", "bool")),
    "Welcome": (2, ("uint", "features", "bin16")),
    "Error": (3, ("text", "text")),
    "Setup": (4, ("text", "text", "layout", "count", "text")),
    "SetupAck": (5, ()),
    "Pages": (6, ("uint", "count", "uint", "nuint")),
    "ZeroPages": (7, ("uint", "count", "uint")),
    "Discard": (8, ("uint", "count")),
    "PrecopyRoundEnd": (9, ("uint", "uint")),
    "Switchover": (10, ()),
    "VmState": (11, ("uint", "nuint")),
    "Running": (12, ()),
    "PageRequest": (13, ("uint", "uint", "count")),
    "Progress": (14, ("uint", "uint")),
    "AllSent": (15, ()),
    "Complete": (16, ("uint",)),
    "CompleteAck": (17, ()),
    "Cancel": (18, ("text",)),
    "ReceivedBitmap": (19, ("uint", "nuint")),
    "DiscardBitmap": (20, ("uint", "nuint")),
    "Ready": (21, ()),
    "Commit": (22, ()),
    "PrecopyRoundAck": (23, ("uint", "uint")),
}
NAMES = {code: name for name, (code, _) in MESSAGES.items()}


class PeerError(Exception):
    """A rule of the spec was broken; ``code`` is a §10 error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RemoteError(PeerError):
    """The other side sent ``Error(code, message)``."""


def _is_uint(v: Any) -> bool:
    return type(v) is int and 0 <= v < 1 << 64


def _kind_ok(kind: str, v: Any) -> bool:
    if kind == "uint":
        return _is_uint(v)
    if kind == "count":
        return type(v) is int and 1 <= v < 1 << 32
    if kind == "nuint":
        return v is None or _is_uint(v)
    if kind == "text":
        return type(v) is str and len(v) <= 4096
    if kind == "bin16":
        return type(v) is bytes and len(v) == 16
    if kind == "bool":
        return type(v) is bool
    if kind == "features":
        return (
            type(v) is list
            and len(v) <= 32
            and all(type(x) is str and 1 <= len(x) <= 64 for x in v)
            and len(set(v)) == len(v)
        )
    if kind == "layout":
        return (
            type(v) is list
            and 1 <= len(v) <= 64
            and all(type(r) is list and len(r) == 3 and all(map(_is_uint, r)) for r in v)
        )
    raise AssertionError(kind)


@dataclass(frozen=True)
class Frame:
    name: str
    fields: list[Any]
    payload: bytes = b""


class Layout:
    """§3: regions ``[gpa, nbytes, page_size]``; the global page index counts region 0's
    pages first."""

    def __init__(self, regions: list[list[int]]) -> None:
        self.regions = [tuple(r) for r in regions]
        self.first_index: list[int] = []
        total = 0
        spans = []
        for gpa, nbytes, page_size in self.regions:
            if not (
                4096 <= page_size <= 1 << 30
                and page_size & (page_size - 1) == 0
                and nbytes > 0
                and gpa % page_size == 0
                and nbytes % page_size == 0
                and gpa + nbytes <= 1 << 64
            ):
                raise PeerError("bad-layout", f"invalid region {[gpa, nbytes, page_size]}")
            self.first_index.append(total)
            total += nbytes // page_size
            spans.append((gpa, gpa + nbytes))
        spans.sort()
        if any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
            raise PeerError("bad-layout", "regions overlap")
        if total > 1 << 32:
            raise PeerError("bad-layout", f"{total} pages")
        self.total_pages = total

    def locate(self, gpa: int, npages: int) -> tuple[int, int]:
        """(region number, global index of the first page) of a valid range, else
        ``bad-range`` (§3)."""
        for n, (start, nbytes, page_size) in enumerate(self.regions):
            if start <= gpa < start + nbytes:
                end = gpa + npages * page_size
                if npages < 1 or (gpa - start) % page_size or end > start + nbytes:
                    break
                return n, self.first_index[n] + (gpa - start) // page_size
        raise PeerError("bad-range", f"range gpa={gpa:#x} npages={npages} not in the layout")

    def page_size_at(self, gpa: int, npages: int) -> int:
        return self.regions[self.locate(gpa, npages)[0]][2]

    def bitmap_nbytes(self) -> int:
        return (self.total_pages + 7) // 8


def checksum(algo: str | None, payload: bytes | memoryview, seed: int) -> int | None:
    """§8: xxh3 seeded with the seed; crc32 over the seed's 8 LE bytes, then the payload."""
    if algo is None:
        return None
    if algo == "xxh3":
        return int(xxhash.xxh3_64_intdigest(payload, seed=seed))
    return zlib.crc32(payload, zlib.crc32(seed.to_bytes(8, "little")))


def checksum_algo(features: list[str]) -> str | None:
    """§5: xxh3 if negotiated, else crc32 if negotiated, else none."""
    if "checksum-xxh3" in features:
        return "xxh3"
    if "checksum-crc32" in features:
        return "crc32"
    return None


class Conn:
    """One TCP connection: frames out (any thread, one at a time) and in (one reader)."""

    def __init__(self, sock: socket.socket, channel: int | None = None) -> None:
        self.sock = sock
        self.channel = channel
        self.algo: str | None = None
        self.layout: Layout | None = None
        self._buf = bytearray()
        self._wlock = threading.Lock()
        self.closed = False

    @property
    def channel_name(self) -> str:
        return CHANNEL_NAMES.get(self.channel, "?") if self.channel is not None else "?"

    # -- sending
    def send(self, name: str, *fields: Any, payload: bytes | memoryview = b"") -> None:
        code, kinds = MESSAGES[name]
        if len(fields) != len(kinds):
            raise AssertionError(f"{name} takes {len(kinds)} fields")
        header = msgpack.packb([code, *fields], use_bin_type=True)
        with self._wlock:
            self.sock.sendall(header)
            if len(payload):
                self.sock.sendall(payload)

    def send_checked(self, name: str, *fields: Any, payload: bytes, seed: int = 0) -> None:
        """A payload frame whose last header field is the checksum (§8)."""
        self.send(name, *fields, checksum(self.algo, payload, seed), payload=payload)

    def send_error(self, code: str, message: str) -> None:
        """Best effort: the connection may be gone already."""
        with contextlib.suppress(OSError):
            self.send("Error", code, message[:4096])

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):  # wakes a reader blocked in recv (close does not)
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- receiving
    def _fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        self._buf += data
        return True

    def _header(self) -> list[Any] | None:
        while True:
            if self._buf:
                unpacker = msgpack.Unpacker(raw=False)
                # A header is at most 65536 bytes: one byte more that does not complete it
                # is frame-too-large (§2), so never feed more than that.
                unpacker.feed(bytes(self._buf[: MAX_HEADER + 1]))
                try:
                    value = unpacker.unpack()
                except msgpack.OutOfData:
                    if len(self._buf) > MAX_HEADER:
                        raise PeerError("frame-too-large", "header over 65536 bytes") from None
                except Exception as exc:
                    raise PeerError("bad-frame", f"undecodable header: {exc}") from None
                else:
                    del self._buf[: unpacker.tell()]
                    if type(value) is not list:
                        raise PeerError("bad-frame", "header is not an array")
                    return value
            if not self._fill():
                if self._buf:
                    raise PeerError("truncated", "stream ended inside a frame header")
                return None

    def _exactly(self, nbytes: int) -> bytes:
        while len(self._buf) < nbytes:
            if not self._fill():
                raise PeerError("truncated", "stream ended inside a payload")
        out = bytes(self._buf[:nbytes])
        del self._buf[:nbytes]
        return out

    def recv(self) -> Frame | None:
        """The next frame, or None at EOF on a frame boundary.  Validates field kinds,
        page ranges against ``self.layout`` and payload checksums."""
        header = self._header()
        if header is None:
            return None
        if not header or type(header[0]) is not int or header[0] not in NAMES:
            raise PeerError("bad-frame", f"unknown type code in {header[:1]!r}")
        name = NAMES[header[0]]
        fields = header[1:]
        kinds = MESSAGES[name][1]
        if len(fields) != len(kinds) or not all(map(_kind_ok, kinds, fields)):
            raise PeerError("bad-frame", f"{name} fields {fields!r} do not match {kinds}")
        nbytes, seed = self._payload_length(name, fields)
        if not nbytes:
            return Frame(name, fields)
        payload = self._exactly(nbytes)
        want = fields[-1]
        if (want is None) != (self.algo is None):
            raise PeerError("protocol", f"{name}: checksum {want!r} but algorithm {self.algo}")
        if want is not None and checksum(self.algo, payload, seed) != want:
            raise PeerError("checksum", f"{name} checksum mismatch")
        return Frame(name, fields, payload)

    def _payload_length(self, name: str, fields: list[Any]) -> tuple[int, int]:
        """(payload bytes, checksum seed) of a frame, checked before the payload is read."""
        if name in ("Pages", "ZeroPages", "Discard", "PageRequest"):
            gpa, npages = fields[1:3] if name == "PageRequest" else fields[0:2]
            if self.layout is None:
                raise PeerError("unexpected", f"{name} before the layout is known")
            page_size = self.layout.page_size_at(gpa, npages)
            if name == "PageRequest" and npages > MAX_REQUEST_PAGES:
                raise PeerError("bad-range", f"request of {npages} pages")
            return (npages * page_size if name == "Pages" else 0), gpa
        if name == "VmState":
            if fields[0] > MAX_VMSTATE:
                raise PeerError("frame-too-large", f"VmState of {fields[0]} bytes")
            return fields[0], 0
        if name in ("ReceivedBitmap", "DiscardBitmap"):
            if self.layout is None or fields[0] != self.layout.bitmap_nbytes():
                raise PeerError("frame-too-large", f"{name} of {fields[0]} bytes")
            return fields[0], 0
        return 0, 0


def connect(addr: tuple[str, int], timeout_s: float = 10.0) -> socket.socket:
    sock = socket.create_connection(addr, timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock
