"""The peer's framing against the byte-level examples of docs/protocol.md §2 (fast, no
KVM): if the spec's examples and the peer disagree, one of them is wrong."""

from __future__ import annotations

import ast
import socket
import zlib
from pathlib import Path

import pytest
import xxhash

from .wire import Conn, Layout, PeerError, checksum

SESSION = bytes(range(16))


def encoded(name: str, *fields: object, payload: bytes = b"") -> bytes:
    a, b = socket.socketpair()
    with a, b:
        Conn(a).send(name, *fields, payload=payload)
        a.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := b.recv(1 << 16):
            out += chunk
        return out


def decoded(data: bytes, layout: Layout | None = None, algo: str | None = None) -> list[object]:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        conn = Conn(b)
        conn.layout, conn.algo = layout, algo
        frames = []
        while (frame := conn.recv()) is not None:
            frames.append([frame.name, *frame.fields, len(frame.payload)])
        return frames


LAYOUT = Layout([[0, 16 << 20, 4096]])
PAGES = bytes.fromhex("95 06 ce 00 10 00 00 02 00 c0")
PAGES_CHECKED = bytes.fromhex("95 06 ce 00 10 00 00 02 07 cf 11 22 33 44 55 66 77 88")
REQUEST = bytes.fromhex("94 0d 07 ce 00 7f f0 00 01")
HELLO = bytes.fromhex(
    "97 01 02 02 00 c4 10 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f"
    "91 ad 63 68 65 63 6b 73 75 6d 2d 78 78 68 33 c2"
)


def test_the_spec_examples_encode_byte_for_byte() -> None:
    assert encoded("Pages", 0x100000, 2, 0, None, payload=bytes(8192)) == PAGES + bytes(8192)
    checked = encoded("Pages", 0x100000, 2, 7, 0x1122334455667788, payload=bytes(8192))
    assert checked == PAGES_CHECKED + bytes(8192)
    assert encoded("PageRequest", 7, 0x7FF000, 1) == REQUEST
    assert encoded("Hello", 2, 2, 0, SESSION, ["checksum-xxh3"], False) == HELLO


def test_the_spec_examples_decode() -> None:
    data = HELLO + PAGES + bytes(8192) + REQUEST
    assert decoded(data, LAYOUT) == [
        ["Hello", 2, 2, 0, SESSION, ["checksum-xxh3"], False, 0],
        ["Pages", 0x100000, 2, 0, None, 8192],
        ["PageRequest", 7, 0x7FF000, 1, 0],
    ]


def test_wider_integer_formats_decode() -> None:
    """§2: decoders accept any valid msgpack encoding (uint64 for a fixint)."""
    wide = bytes.fromhex("94 0d cf 00 00 00 00 00 00 00 07 ce 00 7f f0 00 cd 00 01")
    assert decoded(wide, LAYOUT) == [["PageRequest", 7, 0x7FF000, 1, 0]]


def test_checksums_are_seeded() -> None:
    payload = b"\x01" * 4096
    assert checksum("xxh3", payload, 0x1000) == xxhash.xxh3_64_intdigest(payload, seed=0x1000)
    assert checksum("xxh3", payload, 0x1000) != checksum("xxh3", payload, 0x2000)
    assert checksum("crc32", payload, 5) == zlib.crc32((5).to_bytes(8, "little") + payload)
    good = checksum("xxh3", payload, 0x2000)
    frame = encoded("Pages", 0x2000, 1, 0, good, payload=payload)
    assert decoded(frame, LAYOUT, "xxh3") == [["Pages", 0x2000, 1, 0, good, 4096]]
    with pytest.raises(PeerError, match="checksum"):
        decoded(encoded("Pages", 0x3000, 1, 0, good, payload=payload), LAYOUT, "xxh3")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (bytes.fromhex("94 0d 07 ce 01 00 00 00 01"), "bad-range"),  # past the layout
        (bytes.fromhex("94 0d 07 cd 10 01 01"), "bad-range"),  # unaligned
        (bytes.fromhex("94 0d 07 00 cd 02 01"), "bad-range"),  # 513 pages
        (bytes.fromhex("93 0d 07 00"), "bad-frame"),  # a field missing
        (bytes.fromhex("91 7f"), "bad-frame"),  # unknown type code
        (bytes.fromhex("93 0e c3 00"), "bad-frame"),  # a bool is not a uint
        (bytes.fromhex("93 0e 81 00 00 00"), "bad-frame"),  # a map
        (bytes.fromhex("95 06 00 01 00"), "truncated"),  # EOF inside the header
        (bytes.fromhex("95 06 00 01 00 c0 00 00"), "truncated"),  # EOF inside the payload
        (b"\xdd\x00\x01\x00\x00" + b"\x00" * 70000, "frame-too-large"),  # header > 64 KiB
    ],
)
def test_bad_frames_are_refused_with_their_code(data: bytes, code: str) -> None:
    with pytest.raises(PeerError) as info:
        decoded(data, LAYOUT)
    assert info.value.code == code


def test_the_peer_imports_nothing_of_migrated() -> None:
    """The peer is a second implementation: written from the spec, not from the code."""
    for name in ("peer.py", "wire.py"):
        tree = ast.parse((Path(__file__).parent / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""] if node.level == 0 else []
            else:
                continue
            assert not [m for m in mods if m.split(".")[0] in ("migrated", "tests")], (name, mods)
