"""The migrated wire protocol, version 2, sans-IO.

This package owns no sockets, threads or clocks (a test enforces its imports).  Its
parts, bottom up:

* :mod:`.layout`: ``MemoryRegion`` / ``MemoryLayout`` and page-range validation.
* :mod:`.events`: the message catalogue (frozen dataclasses), enums and limits.
* :mod:`.codec`: the message table and header encoding/decoding.
* :mod:`.rules`: who sends what on which channel (:data:`ROUTES`, the one table the
  channel rules and senders are derived from) and the Hello/Welcome handshake.
* :mod:`.connection`: ``Connection``, one endpoint of one TCP connection.
* :mod:`.state`: the session state machine as a table, with the commit point.
* :mod:`.session`: ``Session``, one migration's connections, table and timers.
* :mod:`.loopback`: two Connections wired in memory (tests, benchmarks).

The written specification is ``docs/protocol.md``; a test checks its tables against
:mod:`.state` and :mod:`.rules`.
"""

from migrated.protocol.connection import Connection
from migrated.protocol.events import (
    FEATURE_CHECKSUM_CRC32,
    FEATURE_CHECKSUM_XXH3,
    KNOWN_FEATURES,
    MAX_HEADER_NBYTES,
    MAX_PAGES_PAYLOAD_NBYTES,
    MAX_REQUEST_NPAGES,
    MAX_VM_STATE_NBYTES,
    MIN_PROTOCOL_VERSION,
    MODES,
    NEED_DATA,
    PROTOCOL_VERSION,
    SESSION_ID_NBYTES,
    Abandon,
    AllSent,
    BeginRecovery,
    Cancel,
    ChannelRole,
    Commit,
    Complete,
    CompleteAck,
    ConnectionClosed,
    Discard,
    DiscardBitmap,
    Error,
    ErrorCode,
    Event,
    Hello,
    LinkLost,
    PageRequest,
    Pages,
    PrecopyRoundAck,
    PrecopyRoundEnd,
    Progress,
    Ready,
    ReceivedBitmap,
    Role,
    Running,
    Setup,
    SetupAck,
    Switchover,
    VmState,
    Welcome,
    ZeroPages,
)
from migrated.protocol.layout import MemoryLayout, MemoryRegion, bitmap_missing_runs
from migrated.protocol.rules import CHANNEL_RULES, ROUTES, SENDERS, Phase, check_welcome, negotiate
from migrated.protocol.session import (
    HandshakeTimeout,
    HeartbeatDue,
    LinkSilent,
    Session,
    TimerEvent,
)
from migrated.protocol.state import TABLE, Direction, MigrationState, Refusal, SessionState

__all__ = [
    "CHANNEL_RULES",
    "FEATURE_CHECKSUM_CRC32",
    "FEATURE_CHECKSUM_XXH3",
    "KNOWN_FEATURES",
    "MAX_HEADER_NBYTES",
    "MAX_PAGES_PAYLOAD_NBYTES",
    "MAX_REQUEST_NPAGES",
    "MAX_VM_STATE_NBYTES",
    "MIN_PROTOCOL_VERSION",
    "MODES",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "ROUTES",
    "SENDERS",
    "SESSION_ID_NBYTES",
    "TABLE",
    "Abandon",
    "AllSent",
    "BeginRecovery",
    "Cancel",
    "ChannelRole",
    "Commit",
    "Complete",
    "CompleteAck",
    "Connection",
    "ConnectionClosed",
    "Direction",
    "Discard",
    "DiscardBitmap",
    "Error",
    "ErrorCode",
    "Event",
    "HandshakeTimeout",
    "HeartbeatDue",
    "Hello",
    "LinkLost",
    "LinkSilent",
    "MemoryLayout",
    "MemoryRegion",
    "MigrationState",
    "PageRequest",
    "Pages",
    "Phase",
    "PrecopyRoundAck",
    "PrecopyRoundEnd",
    "Progress",
    "Ready",
    "ReceivedBitmap",
    "Refusal",
    "Role",
    "Running",
    "Session",
    "SessionState",
    "Setup",
    "SetupAck",
    "Switchover",
    "TimerEvent",
    "VmState",
    "Welcome",
    "ZeroPages",
    "bitmap_missing_runs",
    "check_welcome",
    "negotiate",
]
