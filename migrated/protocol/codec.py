"""Frame header encoding and decoding, driven by one table (:data:`MESSAGES`).

A frame is a msgpack array ``[type_code, field, ...]`` (the *header*, at most 64 KiB)
optionally followed by a raw payload.  For each message the table gives its type
code, event class, the ordered header fields with their *kind* (which fixes the wire
type, bounds and conversion) and a payload rule:

* ``NONE``: no payload.
* ``PAGES``: header ends with ``checksum``; payload = npages * page_size bytes of the
  region holding ``gpa`` (bounded by the connection's ``max_frame_payload``).
* ``BLOB``: header ends with ``nbytes, checksum``; ``nbytes`` ≤ 64 MiB (VmState).
* ``BITMAP``: header ends with ``nbytes, checksum``; ``nbytes`` must equal
  ``layout.bitmap_nbytes`` (ReceivedBitmap, DiscardBitmap).

``checksum`` is msgpack nil when the connection negotiated no checksum, else an
unsigned 64-bit integer (xxh3_64 or crc32 of the payload).

Errors: :func:`decode_header` raises ``RemoteProtocolError`` (codes ``bad-frame``,
``bad-range``, ``bad-layout``, ``frame-too-large``, ``unexpected``) and
:func:`encode_header` raises ``LocalProtocolError`` for the same faults in events we
were asked to send.  Neither ever raises anything else.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from migrated.errors import LocalProtocolError, RemoteProtocolError
from migrated.protocol import events as ev
from migrated.protocol.layout import MemoryLayout, MemoryRegion

_U64_LIMIT = 1 << 64
# Longest array in any header: a 64-region layout (features are at most 32).
_MAX_ARRAY_LEN = 64


class Payload(enum.Enum):
    NONE = "none"
    PAGES = "pages"
    BLOB = "blob"
    BITMAP = "bitmap"


class FieldError(Exception):
    """A header field or payload failed validation.  ``code`` is the protocol error code.

    Raised inside the package only; the connection turns it into Local/RemoteProtocolError.
    """

    def __init__(self, message: str, code: str = ev.ErrorCode.BAD_FRAME) -> None:
        super().__init__(message)
        self.code = code


# --- field kinds: (encode python -> wire, decode wire -> python); both validate -------


def _u64(value: Any) -> int:
    if type(value) is not int or not 0 <= value < _U64_LIMIT:
        raise FieldError(f"expected an unsigned 64-bit integer, got {value!r:.80}")
    return value


def _count(value: Any) -> int:
    # Page counts: 1 .. 2**32 - 1.  Range checks against the layout come later.
    if type(value) is not int or not 1 <= value < 1 << 32:
        raise FieldError(f"expected a page count 1..2**32-1, got {value!r:.80}")
    return value


def _mode(value: Any) -> str:
    if value not in ev.MODES or type(value) is not str:
        raise FieldError(f"mode must be one of {', '.join(ev.MODES)}, got {value!r:.80}")
    return value


def _text(value: Any) -> str:
    if type(value) is not str or len(value) > ev.MAX_TEXT_LEN:
        raise FieldError(f"expected a string of at most {ev.MAX_TEXT_LEN} characters")
    return value


def _boolean(value: Any) -> bool:
    if type(value) is not bool:
        raise FieldError(f"expected a boolean, got {value!r:.80}")
    return value


def _session_id(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != ev.SESSION_ID_NBYTES:
        raise FieldError(f"session_id must be {ev.SESSION_ID_NBYTES} bytes")
    return value


def _features_in(value: Any) -> frozenset[str]:
    if type(value) is not list or len(value) > ev.MAX_FEATURES:
        raise FieldError(f"features must be a list of at most {ev.MAX_FEATURES} strings")
    for name in value:
        if type(name) is not str or not 0 < len(name) <= ev.MAX_FEATURE_NAME_LEN:
            raise FieldError(f"feature names are 1..{ev.MAX_FEATURE_NAME_LEN} characters")
    result = frozenset(value)
    if len(result) != len(value):
        raise FieldError("duplicate feature names")
    return result


def _features_out(value: Any) -> list[str]:
    if not isinstance(value, frozenset):
        raise FieldError("features must be a frozenset of strings")
    listed = sorted(value) if all(type(n) is str for n in value) else list(value)
    _features_in(listed)
    return listed


def _channel_role_in(value: Any) -> ev.ChannelRole:
    if type(value) is not int:
        raise FieldError(f"channel role must be an integer, got {value!r:.80}")
    try:
        return ev.ChannelRole(value)
    except ValueError:
        raise FieldError(f"unknown channel role {value}") from None


def _channel_role_out(value: Any) -> int:
    if not isinstance(value, ev.ChannelRole):
        raise FieldError(f"role must be a ChannelRole, got {value!r:.80}")
    return int(value)


def _layout_in(value: Any) -> MemoryLayout:
    if type(value) is not list:
        raise FieldError(
            "layout must be a list of [gpa, nbytes, page_size]", ev.ErrorCode.BAD_LAYOUT
        )
    regions = []
    for item in value:
        if type(item) is not list or len(item) != 3:
            raise FieldError("layout regions are [gpa, nbytes, page_size]", ev.ErrorCode.BAD_LAYOUT)
        regions.append(MemoryRegion(*(_u64(x) for x in item)))
    try:
        return MemoryLayout(tuple(regions))
    except ValueError as exc:
        raise FieldError(f"invalid memory layout: {exc}", ev.ErrorCode.BAD_LAYOUT) from None


def _layout_out(value: Any) -> list[list[int]]:
    if not isinstance(value, MemoryLayout):
        raise FieldError("layout must be a MemoryLayout", ev.ErrorCode.BAD_LAYOUT)
    return [[r.gpa, r.nbytes, r.page_size] for r in value.regions]


@dataclass(frozen=True, slots=True)
class Kind:
    """How one header field travels: ``encode`` and ``decode`` validate and convert."""

    name: str
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


U64 = Kind("u64", _u64, _u64)
COUNT = Kind("count", _count, _count)
TEXT = Kind("text", _text, _text)
MODE = Kind("mode", _mode, _mode)
BOOL = Kind("bool", _boolean, _boolean)
SESSION_ID = Kind("session_id", _session_id, _session_id)
FEATURES = Kind("features", _features_out, _features_in)
CHANNEL_ROLE = Kind("channel_role", _channel_role_out, _channel_role_in)
LAYOUT = Kind("layout", _layout_out, _layout_in)


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """One row of the message table."""

    code: int
    cls: type
    fields: tuple[tuple[str, Kind], ...]
    payload: Payload = Payload.NONE

    header_len: int = 0  # derived: elements in the header array, type code included

    def __post_init__(self) -> None:
        extra = {Payload.NONE: 0, Payload.PAGES: 1, Payload.BLOB: 2, Payload.BITMAP: 2}
        object.__setattr__(self, "header_len", 1 + len(self.fields) + extra[self.payload])


_RANGE = (("gpa", U64), ("npages", COUNT))

MESSAGES: tuple[MessageSpec, ...] = (
    MessageSpec(
        1,
        ev.Hello,
        (
            ("version", U64),
            ("min_version", U64),
            ("role", CHANNEL_ROLE),
            ("session_id", SESSION_ID),
            ("features", FEATURES),
            ("resume", BOOL),
        ),
    ),
    MessageSpec(
        2, ev.Welcome, (("version", U64), ("features", FEATURES), ("session_id", SESSION_ID))
    ),
    MessageSpec(3, ev.Error, (("code", TEXT), ("message", TEXT))),
    MessageSpec(
        4,
        ev.Setup,
        (
            ("vm_name", TEXT),
            ("vm_uuid", TEXT),
            ("layout", LAYOUT),
            ("vcpu_count", COUNT),
            ("mode", MODE),
        ),
    ),
    MessageSpec(5, ev.SetupAck, ()),
    MessageSpec(6, ev.Pages, (*_RANGE, ("request_id", U64)), Payload.PAGES),
    MessageSpec(7, ev.ZeroPages, (*_RANGE, ("request_id", U64))),
    MessageSpec(8, ev.Discard, _RANGE),
    MessageSpec(9, ev.PrecopyRoundEnd, (("round", U64), ("dirty_pages", U64))),
    MessageSpec(10, ev.Switchover, ()),
    MessageSpec(11, ev.VmState, (), Payload.BLOB),
    MessageSpec(12, ev.Running, ()),
    MessageSpec(13, ev.PageRequest, (("request_id", U64), *_RANGE)),
    MessageSpec(14, ev.Progress, (("payload_bytes", U64), ("pages_remaining", U64))),
    MessageSpec(15, ev.AllSent, ()),
    MessageSpec(16, ev.Complete, (("pages_installed", U64),)),
    MessageSpec(17, ev.CompleteAck, ()),
    MessageSpec(18, ev.Cancel, (("reason", TEXT),)),
    MessageSpec(19, ev.ReceivedBitmap, (), Payload.BITMAP),
    MessageSpec(20, ev.DiscardBitmap, (), Payload.BITMAP),
    MessageSpec(21, ev.Ready, ()),
    MessageSpec(22, ev.Commit, ()),
    MessageSpec(23, ev.PrecopyRoundAck, (("round", U64), ("bytes_received", U64))),
)

PAGES_CODE = 6  # the hot message; Connection has a fast path checked against the table
U64_LIMIT = _U64_LIMIT

BY_CODE: dict[int, MessageSpec] = {spec.code: spec for spec in MESSAGES}
BY_CLASS: dict[type, MessageSpec] = {spec.cls: spec for spec in MESSAGES}


# --- checksums ----------------------------------------------------------------------

CHECKSUM_XXH3 = "xxh3"
CHECKSUM_CRC32 = "crc32"


def _xxh3(data: Any, seed: int) -> int:
    return xxhash.xxh3_64_intdigest(data, seed)


def _crc32(data: Any, seed: int) -> int:
    return zlib.crc32(data, zlib.crc32(seed.to_bytes(8, "little")))


#: ``fn(payload, seed) -> int``.  The seed binds the payload to its place: it is the
#: ``gpa`` for Pages and 0 for other payloads.  xxh3: XXH3_64bits_withSeed(payload,
#: seed).  crc32: zlib's crc32 over the 8-byte little-endian seed, then the payload.
ChecksumFn = Callable[[Any, int], int]
CHECKSUMS: dict[str, ChecksumFn] = {CHECKSUM_XXH3: _xxh3, CHECKSUM_CRC32: _crc32}


def checksum_seed(event: Any) -> int:
    """The checksum seed of a payload message: its gpa for Pages, else 0."""
    return event.gpa if type(event) is ev.Pages else 0


def choose_checksum(features: frozenset[str]) -> str | None:
    """The checksum algorithm implied by negotiated features: xxh3, else crc32, else None."""
    if ev.FEATURE_CHECKSUM_XXH3 in features:
        return CHECKSUM_XXH3
    if ev.FEATURE_CHECKSUM_CRC32 in features:
        return CHECKSUM_CRC32
    return None


# --- header encode / decode ---------------------------------------------------------


def _payload_size(
    spec: MessageSpec,
    event: Any,
    declared_nbytes: int | None,
    layout: MemoryLayout | None,
    max_pages_nbytes: int,
) -> int:
    """Payload size a message needs (raises FieldError if its range or size is invalid)."""
    rule = spec.payload
    if rule is Payload.BLOB:
        assert declared_nbytes is not None
        if declared_nbytes > ev.MAX_VM_STATE_NBYTES:
            raise FieldError(
                f"VmState of {declared_nbytes} bytes exceeds {ev.MAX_VM_STATE_NBYTES}",
                ev.ErrorCode.FRAME_TOO_LARGE,
            )
        return declared_nbytes
    if layout is None:
        raise FieldError(
            f"{spec.cls.__name__} before the memory layout is known", ev.ErrorCode.UNEXPECTED
        )
    if rule is Payload.BITMAP:
        if declared_nbytes != layout.bitmap_nbytes:
            raise FieldError(
                f"{spec.cls.__name__} of {declared_nbytes} bytes, layout needs "
                f"{layout.bitmap_nbytes}",
                ev.ErrorCode.FRAME_TOO_LARGE,
            )
        return declared_nbytes
    nbytes = _range_nbytes(layout, event.gpa, event.npages)
    if nbytes > max_pages_nbytes:
        raise FieldError(
            f"Pages payload of {nbytes} bytes exceeds the limit of {max_pages_nbytes}",
            ev.ErrorCode.FRAME_TOO_LARGE,
        )
    return nbytes


def decode_trailer(
    spec: MessageSpec,
    event: Any,
    trailer: list[Any],
    layout: MemoryLayout | None,
    max_pages_nbytes: int,
    checksum_algo: str | None,
) -> tuple[int, int | None]:
    """Validate the payload fields of a received header: returns (nbytes, checksum).

    Raises FieldError (the connection wraps it in RemoteProtocolError).
    """
    declared = None
    if spec.payload is not Payload.PAGES:
        declared = _u64(trailer[0])
    checksum = trailer[-1]
    if checksum_algo is None:
        if checksum is not None:
            raise FieldError("frame carries a checksum but none was negotiated")
    elif checksum is None:
        raise FieldError("frame lacks the negotiated checksum")
    else:
        _u64(checksum)
    return _payload_size(spec, event, declared, layout, max_pages_nbytes), checksum


def encode_trailer(
    spec: MessageSpec,
    event: Any,
    layout: MemoryLayout | None,
    max_pages_nbytes: int,
    checksum_algo: str | None,
) -> tuple[list[Any], memoryview]:
    """Validate an outgoing payload; returns (trailer fields, payload view).  Raises FieldError."""
    data = event.data
    if data is None:
        raise FieldError(f"{spec.cls.__name__}.data is missing")
    try:
        view = data if type(data) is memoryview else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except (TypeError, ValueError):
        raise FieldError(f"{spec.cls.__name__}.data is not a contiguous buffer") from None
    declared = view.nbytes
    needed = _payload_size(spec, event, declared, layout, max_pages_nbytes)
    if needed != declared:
        raise FieldError(
            f"{spec.cls.__name__} payload is {declared} bytes, its header needs {needed}"
        )
    checksum = (
        None if checksum_algo is None else CHECKSUMS[checksum_algo](view, checksum_seed(event))
    )
    if spec.payload is Payload.PAGES:
        return [checksum], view
    return [declared, checksum], view


def _range_nbytes(layout: MemoryLayout, gpa: int, npages: int) -> int:
    try:
        return layout.range_nbytes(gpa, npages)
    except RemoteProtocolError as exc:
        raise FieldError(str(exc), ev.ErrorCode.BAD_RANGE) from None


def check_event_ranges(event: Any, layout: MemoryLayout | None) -> None:
    """Validate the page range of ZeroPages / Discard / PageRequest (raises FieldError)."""
    if layout is None:
        raise FieldError("a page message arrived before the memory layout", ev.ErrorCode.UNEXPECTED)
    _range_nbytes(layout, event.gpa, event.npages)
    if type(event) is ev.PageRequest:
        if event.npages > ev.MAX_REQUEST_NPAGES:
            raise FieldError(
                f"PageRequest of {event.npages} pages exceeds {ev.MAX_REQUEST_NPAGES}",
                ev.ErrorCode.BAD_RANGE,
            )
        if event.request_id == 0:
            raise FieldError("PageRequest.request_id must be nonzero")


def encode_fields(event: Any) -> tuple[MessageSpec, list[Any]]:
    """Validate an event's header fields and return its spec and wire list (no payload
    trailer).  Raises LocalProtocolError on an unknown event type or invalid field."""
    spec = BY_CLASS.get(type(event))
    if spec is None:
        raise LocalProtocolError(f"{type(event).__name__} is not a wire message")
    wire: list[Any] = [spec.code]
    try:
        for name, kind in spec.fields:
            wire.append(kind.encode(getattr(event, name)))
    except FieldError as exc:
        raise LocalProtocolError(f"cannot send {spec.cls.__name__}: {exc}", code=exc.code) from None
    return spec, wire


def decode_fields(obj: Any) -> tuple[MessageSpec, Any, list[Any]]:
    """Turn a decoded msgpack header into (spec, event without payload, trailer).

    ``trailer`` holds the payload fields (``[checksum]`` or ``[nbytes, checksum]``),
    not yet validated.  Raises RemoteProtocolError (``bad-frame``/``bad-layout``).
    """
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise RemoteProtocolError(
            "frame header is not an array starting with an integer type code",
            code=ev.ErrorCode.BAD_FRAME,
        )
    spec = BY_CODE.get(obj[0])
    if spec is None:
        raise RemoteProtocolError(f"unknown message type {obj[0]}", code=ev.ErrorCode.BAD_FRAME)
    if len(obj) != spec.header_len:
        raise RemoteProtocolError(
            f"{spec.cls.__name__} header has {len(obj)} elements, expected {spec.header_len}",
            code=ev.ErrorCode.BAD_FRAME,
        )
    nfields = len(spec.fields)
    try:
        values = {name: kind.decode(obj[i + 1]) for i, (name, kind) in enumerate(spec.fields)}
    except FieldError as exc:
        raise RemoteProtocolError(
            f"invalid {spec.cls.__name__} header: {exc}", code=exc.code
        ) from None
    return spec, spec.cls(**values), obj[1 + nfields :]


OutOfData = msgpack.OutOfData


def packb(wire: list[Any]) -> bytes:
    """msgpack-encode a header list (bin type for bytes, str type for text)."""
    return msgpack.packb(wire, use_bin_type=True)


def new_packer() -> Callable[[Any], bytes]:
    """A reusable header encoder equivalent to :func:`packb` (not thread-safe)."""
    return msgpack.Packer(use_bin_type=True, autoreset=True).pack


def new_unpacker() -> Any:
    """A streaming msgpack decoder with the protocol's hostile-input limits."""
    return msgpack.Unpacker(
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_buffer_size=ev.MAX_HEADER_NBYTES,
        max_str_len=4 * ev.MAX_TEXT_LEN,
        max_bin_len=64,
        max_array_len=_MAX_ARRAY_LEN,
        max_map_len=0,
        max_ext_len=0,
    )
