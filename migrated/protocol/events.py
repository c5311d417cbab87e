"""The message catalogue: one frozen dataclass per message, plus local events.

Wire messages (see docs/protocol.md for channels, directions and limits) are the
classes listed in :data:`WIRE_EVENT_TYPES`.  Payload-carrying messages (``Pages``,
``VmState``, ``ReceivedBitmap``) have a ``data`` field: a ``memoryview`` of exactly
the payload length when received or sent; ``None`` only in the *header event* handed
to a payload sink (see :meth:`Connection.set_payload_sink`).

Local events never travel on the wire.  The engine feeds them to
:class:`~migrated.protocol.state.SessionState` (``LinkLost``, ``BeginRecovery``,
``Abandon``) or gets them from :meth:`Connection.next_event` (``ConnectionClosed``:
the peer closed the TCP stream cleanly between frames).

Contracts: constructors do no validation (cheap on the hot path); the connection
validates every field of every event it sends (``LocalProtocolError``) or receives
(``RemoteProtocolError``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from migrated.protocol.layout import MemoryLayout

PROTOCOL_VERSION = 2
#: Version 1 had no commit point (the destination ran the guest as soon as the state
#: arrived), so a version-2 peer refuses it: see docs/protocol.md §11.
MIN_PROTOCOL_VERSION = 2

SESSION_ID_NBYTES = 16
MAX_HEADER_NBYTES = 64 * 1024
MAX_PAGES_PAYLOAD_NBYTES = 16 * 1024 * 1024
MAX_VM_STATE_NBYTES = 64 * 1024 * 1024
MAX_REQUEST_NPAGES = 512
MAX_FEATURES = 32
MAX_FEATURE_NAME_LEN = 64
MAX_TEXT_LEN = 4096

#: ``Setup.mode`` values.  What the mode means to a destination: nothing it must act
#: on (the source drives every phase); it is recorded and reported.
MODES = ("postcopy", "hybrid", "precopy")

FEATURE_CHECKSUM_XXH3 = "checksum-xxh3"
FEATURE_CHECKSUM_CRC32 = "checksum-crc32"
#: Features this implementation understands.  Unknown offered features are ignored.
KNOWN_FEATURES = frozenset({FEATURE_CHECKSUM_XXH3, FEATURE_CHECKSUM_CRC32})


class Role(enum.Enum):
    """Which side of the migration an endpoint is.  The source connects."""

    SOURCE = "source"
    DESTINATION = "destination"

    @property
    def peer(self) -> Role:
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


class ChannelRole(enum.IntEnum):
    """What a TCP connection of a session carries; announced in its ``Hello``.

    MAIN carries the control conversation, URGENT page requests and their answers,
    BULK background page pushes.  A session may open several BULK connections.
    """

    MAIN = 0
    URGENT = 1
    BULK = 2


class _NeedData:
    """Sentinel type for :data:`NEED_DATA`."""

    _instance: _NeedData | None = None

    def __new__(cls) -> _NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``Connection.next_event`` when more bytes are needed.
NEED_DATA = _NeedData()


class ErrorCode:
    """Values of ``Error.code`` and ``ProtocolError.code`` used by this implementation."""

    PROTOCOL = "protocol"  # generic rule violation
    BAD_FRAME = "bad-frame"  # undecodable header, unknown type, wrong field type/count
    FRAME_TOO_LARGE = "frame-too-large"  # header > 64 KiB or payload over its limit
    BAD_RANGE = "bad-range"  # page range outside the layout / unaligned / too long
    BAD_LAYOUT = "bad-layout"  # Setup layout invalid
    CHECKSUM = "checksum"  # payload checksum mismatch
    VERSION = "version"  # no common protocol version
    UNEXPECTED = "unexpected"  # message not allowed on this channel / in this state
    TRUNCATED = "truncated"  # stream ended inside a frame
    FEATURE = "feature"  # Welcome accepted a feature that was not offered
    CANCEL_REFUSED = "cancel-refused"  # Cancel after the commit
    SESSION_UNKNOWN = "session-unknown"  # resume Hello for a session we do not know
    SESSION_FAILED = "session-failed"  # resume refused: the session ended before Ready
    BUSY = "busy"  # another session is in progress here, or a connection limit is reached
    UNSUPPORTED_VM = "unsupported-vm"  # a valid VM this destination cannot host
    INSUFFICIENT_MEMORY = "insufficient-memory"  # not enough memory here for the guest
    RESTORE_FAILED = "restore-failed"  # the VM state could not be restored here
    TIMEOUT = "timeout"  # no heartbeat (or no handshake) within the limit
    INTERNAL = "internal"  # the sender failed locally (details in the message)


# --- connection opening -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of every connection, source → destination."""

    version: int
    min_version: int
    role: ChannelRole
    session_id: bytes
    features: frozenset[str]
    resume: bool = False


@dataclass(frozen=True, slots=True)
class Welcome:
    """Destination's acceptance of a Hello: agreed version and feature intersection."""

    version: int
    features: frozenset[str]
    session_id: bytes


@dataclass(frozen=True, slots=True)
class Error:
    """Terminal for the connection, either direction.  ``code`` from :class:`ErrorCode`."""

    code: str
    message: str


# --- main channel -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    """Source describes the VM.  ``mode`` is one of :data:`MODES` (informational)."""

    vm_name: str
    vm_uuid: str
    layout: MemoryLayout
    vcpu_count: int
    mode: str


@dataclass(frozen=True, slots=True)
class SetupAck:
    """Destination is ready to receive pages."""


@dataclass(frozen=True, slots=True)
class Pages:
    """``npages`` pages starting at ``gpa``; payload = npages * page_size bytes.

    ``request_id`` is nonzero when the pages answer a ``PageRequest``.
    """

    gpa: int
    npages: int
    data: memoryview | None = None
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class ZeroPages:
    """``npages`` all-zero pages at ``gpa`` (no payload).  ``request_id`` as for Pages."""

    gpa: int
    npages: int
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class Discard:
    """Pages sent earlier but dirtied since: the destination must drop them."""

    gpa: int
    npages: int


@dataclass(frozen=True, slots=True)
class DiscardBitmap:
    """Pages sent earlier but dirtied since, as a bitmap (1 bit per global page, LSB
    first, the ReceivedBitmap layout): one frame instead of a Discard per run when the
    stale set is scattered.  The destination must drop every page whose bit is set."""

    data: memoryview | None = None


@dataclass(frozen=True, slots=True)
class PrecopyRoundEnd:
    """Precopy round ``round`` ended with ``dirty_pages`` dirty pages."""

    round: int
    dirty_pages: int


@dataclass(frozen=True, slots=True)
class PrecopyRoundAck:
    """Destination → source: round ``round`` is processed; ``bytes_received`` page
    payload bytes have arrived so far on all channels."""

    round: int
    bytes_received: int


@dataclass(frozen=True, slots=True)
class Switchover:
    """The source has paused the VM; final pages/discards and VmState follow on MAIN."""


@dataclass(frozen=True, slots=True)
class VmState:
    """The device/vCPU state record (at most 64 MiB; docs/protocol.md §12)."""

    data: memoryview | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """Destination → source: it holds the complete VM state, can run it, and waits
    for Commit.  Sent again on a resumed MAIN while it still waits."""


@dataclass(frozen=True, slots=True)
class Commit:
    """Source → destination: run the guest.  Sending it is the source's point of no
    return; receiving it is the destination's."""


@dataclass(frozen=True, slots=True)
class Running:
    """Destination → source: the vCPUs run (informational; ends the downtime)."""


@dataclass(frozen=True, slots=True)
class PageRequest:
    """Destination → source: please send ``npages`` (≤ 512) pages at ``gpa`` urgently."""

    request_id: int
    gpa: int
    npages: int


@dataclass(frozen=True, slots=True)
class Progress:
    """The heartbeat, either direction, on MAIN at least every second.

    ``payload_bytes``: page payload bytes this side has sent (source) or received
    (destination) on all channels of the session.  ``pages_remaining``: pages the
    sender believes the destination still lacks."""

    payload_bytes: int
    pages_remaining: int


@dataclass(frozen=True, slots=True)
class AllSent:
    """Source → destination: every page was sent at least once since switchover."""


@dataclass(frozen=True, slots=True)
class Complete:
    """Destination → source: every page is installed."""

    pages_installed: int


@dataclass(frozen=True, slots=True)
class CompleteAck:
    """Source → destination: the source has released the VM; the migration is done."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """Source → destination, only before Commit: the source keeps (or resumed) the VM."""

    reason: str


@dataclass(frozen=True, slots=True)
class ReceivedBitmap:
    """Destination → source after a resume Welcome: 1 bit per global page, LSB first."""

    data: memoryview | None = None


# --- local events (never on the wire) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """``next_event``: the peer closed the stream cleanly at a frame boundary."""


@dataclass(frozen=True, slots=True)
class LinkLost:
    """Session: a channel of the session failed (EOF, reset, timeout)."""


@dataclass(frozen=True, slots=True)
class BeginRecovery:
    """Session: the engine starts the recovery handshake."""


@dataclass(frozen=True, slots=True)
class Abandon:
    """Session: the operator gives up an in-doubt or paused session (``cont --force``
    on a source, ``cancel --force`` or ``stop --force`` on a destination)."""


WireEvent = (
    Hello
    | Welcome
    | Error
    | Setup
    | SetupAck
    | Pages
    | ZeroPages
    | Discard
    | DiscardBitmap
    | PrecopyRoundEnd
    | PrecopyRoundAck
    | Switchover
    | VmState
    | Ready
    | Commit
    | Running
    | PageRequest
    | Progress
    | AllSent
    | Complete
    | CompleteAck
    | Cancel
    | ReceivedBitmap
)
LocalEvent = LinkLost | BeginRecovery | Abandon
Event = WireEvent | ConnectionClosed

WIRE_EVENT_TYPES: tuple[type, ...] = (
    Hello,
    Welcome,
    Error,
    Setup,
    SetupAck,
    Pages,
    ZeroPages,
    Discard,
    DiscardBitmap,
    PrecopyRoundEnd,
    PrecopyRoundAck,
    Switchover,
    VmState,
    Ready,
    Commit,
    Running,
    PageRequest,
    Progress,
    AllSent,
    Complete,
    CompleteAck,
    Cancel,
    ReceivedBitmap,
)
LOCAL_EVENT_TYPES: tuple[type, ...] = (LinkLost, BeginRecovery, Abandon)
