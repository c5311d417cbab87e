"""VmState: everything needed to continue a paused VM in another VM (or process).

The record holds the vCPU states and the device state; guest memory travels separately
(the migration streams it, or a test copies it).  ``to_bytes``/``from_bytes`` use
msgpack with a magic string and a version number; a record from another version, or
bytes that are not a VmState at all, raise :class:`VmStateError` naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from migrated.errors import VmStateError
from migrated.kernel import VcpuState

from .devices import StatusReport
from .image import ImageInfo

__all__ = ["STATE_MAGIC", "STATE_VERSION", "MemoryRegionInfo", "VmState", "VmStateError"]

STATE_MAGIC = "migrated-vmstate"
STATE_VERSION = 1


@dataclass(frozen=True)
class MemoryRegionInfo:
    slot: int
    gpa: int
    nbytes: int


@dataclass(frozen=True)
class VmState:
    """A paused VM: vCPU states plus device state.  Frozen; see the module notes.

    ``halted[i]`` says vCPU i had ended (HLT / STATUS_HALT): it is restored but not run.
    ``config`` is ``VmConfig.to_dict()`` of the VM.
    """

    config: dict[str, Any]
    regions: tuple[MemoryRegionInfo, ...]
    image: ImageInfo
    params: tuple[int, ...]
    vcpus: tuple[VcpuState, ...]
    halted: tuple[bool, ...]
    console_bytes: int
    report_seqs: tuple[int, ...]
    reports: tuple[StatusReport, ...]
    pending_commands: tuple[int, ...]
    version: int = STATE_VERSION

    @property
    def memory_bytes(self) -> int:
        return sum(r.nbytes for r in self.regions)

    def to_bytes(self) -> bytes:
        record = {
            "magic": STATE_MAGIC,
            "version": self.version,
            "config": self.config,
            "regions": [[r.slot, r.gpa, r.nbytes] for r in self.regions],
            "image": self.image.to_dict(),
            "params": list(self.params),
            "vcpus": [v.to_dict() for v in self.vcpus],
            "halted": list(self.halted),
            "console_bytes": self.console_bytes,
            "report_seqs": list(self.report_seqs),
            "reports": [r.to_dict() for r in self.reports],
            "pending_commands": list(self.pending_commands),
        }
        return msgpack.packb(record, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> VmState:
        """Decode a record.  Raises VmStateError for anything but a valid record of
        this version."""
        try:
            record = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types
            raise VmStateError(f"VM state is not a msgpack record: {exc}") from exc
        if not isinstance(record, dict) or record.get("magic") != STATE_MAGIC:
            raise VmStateError("bytes are not a migrated VM state record (magic missing)")
        version = record.get("version")
        if version != STATE_VERSION:
            raise VmStateError(
                f"VM state record has version {version!r}; this migrated reads version "
                f"{STATE_VERSION}",
                hint="run the same migrated version on both hosts",
            )
        try:
            vcpus = tuple(VcpuState.from_dict(v) for v in record["vcpus"])
            state = cls(
                config=dict(record["config"]),
                regions=tuple(
                    MemoryRegionInfo(int(s), int(g), int(n)) for s, g, n in record["regions"]
                ),
                image=ImageInfo.from_dict(record["image"]),
                params=tuple(int(p) for p in record["params"]),
                vcpus=vcpus,
                halted=tuple(bool(h) for h in record["halted"]),
                console_bytes=int(record["console_bytes"]),
                report_seqs=tuple(int(s) for s in record["report_seqs"]),
                reports=tuple(StatusReport.from_dict(r) for r in record["reports"]),
                pending_commands=tuple(int(c) for c in record["pending_commands"]),
                version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VmStateError(f"VM state record is malformed: {exc!r}") from exc
        n = len(state.vcpus)
        if not (len(state.halted) == len(state.report_seqs) == len(state.pending_commands) == n):
            raise VmStateError(
                f"VM state record is inconsistent: per-vCPU lists differ from {n} vCPUs"
            )
        if any(v.index != i for i, v in enumerate(state.vcpus)):
            raise VmStateError("VM state record lists vCPUs out of order")
        return state
