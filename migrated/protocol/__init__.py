"""The migrated wire protocol, sans-IO.

This package owns no sockets, threads or clocks (a test enforces its imports).  Its
parts:

* :mod:`.layout`: ``MemoryRegion`` / ``MemoryLayout`` and page-range validation.
* :mod:`.events`: the message catalogue (frozen dataclasses), enums and limits.
* :mod:`.codec`: the message table and header encoding/decoding.
* :mod:`.rules`: per-connection rules (channel table, handshake, ``negotiate``).
* :mod:`.connection`: ``Connection``, one endpoint of one TCP connection.
* :mod:`.loopback`: two Connections wired in memory (tests, benchmarks).
* :mod:`.state`: ``SessionState``, the per-role session state machine (tables).

The written specification is ``docs/protocol.md``.
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
    NEED_DATA,
    PROTOCOL_VERSION,
    SESSION_ID_NBYTES,
    Abandon,
    AllSent,
    BeginRecovery,
    Cancel,
    ChannelRole,
    Complete,
    CompleteAck,
    ConnectionClosed,
    Discard,
    Error,
    ErrorCode,
    Event,
    Hello,
    LinkLost,
    PageRequest,
    Pages,
    PrecopyRoundEnd,
    Progress,
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
from migrated.protocol.rules import CHANNEL_RULES, Phase, check_welcome, negotiate
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
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SESSION_ID_NBYTES",
    "TABLE",
    "Abandon",
    "AllSent",
    "BeginRecovery",
    "Cancel",
    "ChannelRole",
    "Complete",
    "CompleteAck",
    "Connection",
    "ConnectionClosed",
    "Direction",
    "Discard",
    "Error",
    "ErrorCode",
    "Event",
    "Hello",
    "LinkLost",
    "MemoryLayout",
    "MemoryRegion",
    "MigrationState",
    "PageRequest",
    "Pages",
    "Phase",
    "PrecopyRoundEnd",
    "Progress",
    "ReceivedBitmap",
    "Refusal",
    "Role",
    "Running",
    "SessionState",
    "Setup",
    "SetupAck",
    "Switchover",
    "VmState",
    "Welcome",
    "ZeroPages",
    "bitmap_missing_runs",
    "check_welcome",
    "negotiate",
]
