"""What an operator can ask of a migration: modes, limits, timeouts (frozen records)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Mode", "RecvOptions", "SendOptions"]


class Mode(enum.Enum):
    POSTCOPY = "postcopy"  # switch over at once
    HYBRID = "hybrid"  # precopy rounds, then postcopy
    PRECOPY = "precopy"  # classic: converge, then move the rest while paused


@dataclass(frozen=True)
class SendOptions:
    mode: Mode = Mode.HYBRID
    max_precopy_rounds: int = 5
    precopy_time_limit_s: float = 60.0
    #: precopy mode switches over once a round's dirty set is at most this many pages
    converge_pages: int = 1024
    frame_pages: int = 256  # 1 MiB page frames (urgent answers are single pages)
    checksum: bool = False
    connect_timeout_s: float = 10.0
    #: how long the paused source waits for the destination's Ready (it resumes the
    #: VM after that: the destination cannot run it without our Commit)
    ready_timeout_s: float = 30.0
    #: how long `migrated send` waits for a paused postcopy to come back before it
    #: reports exit 3; the migration itself keeps reconnecting for as long as it takes
    recovery_timeout_s: float = 300.0
    #: longest pause between two reconnection attempts
    max_retry_interval_s: float = 5.0
    #: push postcopy pages on a BULK connection from a thread (MAIN if refused)
    bulk_channel: bool = True
    progress_interval_s: float = 0.25
    heartbeat_interval_s: float = 1.0
    #: a MAIN channel silent this long is declared dead
    heartbeat_timeout_s: float = 5.0
    #: bandwidth caps in bytes/s (0: unlimited), as virsh's --bandwidth and
    #: --postcopy-bandwidth: precopy and switchover, and the postcopy background push
    precopy_bandwidth: int = 0
    postcopy_bandwidth: int = 0


@dataclass(frozen=True)
class RecvOptions:
    max_ram_bytes: int = 64 << 30
    max_vcpus: int = 8
    max_frame_nbytes: int = 4 << 20
    #: staging buffers for bulk frames installed by the installer thread
    install_buffers: int = 6
    console: str | None = None
    prefault: bool = True
    progress_interval_s: float = 0.25
    heartbeat_interval_s: float = 1.0
    #: a MAIN channel silent this long is declared dead
    heartbeat_timeout_s: float = 5.0
    #: connections that have not finished their handshake, at most, at once
    max_pending_connections: int = 32
    #: connections of the session at once (MAIN, URGENT, BULK and replacements)
    max_session_connections: int = 16
    handshake_timeout_s: float = 10.0
    #: memory to keep free beyond the guest when admitting it (bytes)
    memory_headroom_bytes: int = 64 << 20
    #: hold the guest's memory from Setup (filled in, ~0.4 s per GiB here) and give it
    #: back as pages arrive, so admission cannot be raced (see vmm.admission)
    reserve_memory: bool = False
