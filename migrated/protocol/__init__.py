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

Additions to and deviations from the design note of issue #3:

* ``SessionState.handle(event, direction, *, channel=ChannelRole.MAIN)``: the table key
  is ``(role, state, direction, event type)``; the channel matters only for an Error
  the source receives in DEVICE.
* One more state, ``MigrationState.DEVICE`` (QEMU's name): VmState sent/received, the
  guest not yet known to run.  Cancel is allowed up to SWITCHOVER, refused from DEVICE.
* Local events ``LinkLost``, ``BeginRecovery`` and ``Abandon`` (``session.abandon()``:
  the operator gives up a paused postcopy; FAILED with the point of no return kept).
* ``ZeroPages`` has ``request_id`` (a requested zero page is answered with ZeroPages).
* ``next_event`` returns ``ConnectionClosed()`` after a clean EOF between frames.
* Checksums are seeded with the frame's gpa (Pages) so data cannot land at the wrong
  address unnoticed; VmState and ReceivedBitmap carry checksums too.
* ``Connection(role=DESTINATION, channel=None)`` adopts the channel its Hello names.
* ``payload_target()`` first drains bytes buffered in the decoder into the sink, and
  returns None if they completed the payload.  The header event passed to the sink is
  the same object ``next_event`` later returns, with ``data`` filled in.
* ``Pages`` takes a hand-inlined fast path in ``send``/``next_event``; a test checks it
  produces the table path's bytes, and it falls back to the table path for anything
  unusual (so the errors are the table path's).
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
    DiscardBitmap,
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
    "DiscardBitmap",
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
