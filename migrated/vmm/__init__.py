"""The embedded VMM: boots guests under the boot ABI (docs/boot-abi.md), runs their
vCPUs in threads, pauses/resumes them, and captures/restores their state."""

from .config import GuestConfig, VmConfig, load_config
from .devices import Command, StatusCode, StatusReport
from .dirtylog import DirtyLog, SpareVcpu
from .image import ImageInfo
from .machine import (
    KICK_SIGNAL,
    CrashInfo,
    Machine,
    MachineStateError,
    MachineStatus,
    MemoryRegion,
    Runstate,
    VcpuRunstate,
    VcpuStatus,
    install_kick_handler,
)
from .shell import VmShell
from .state import VmState, VmStateError

__all__ = [
    "KICK_SIGNAL",
    "Command",
    "CrashInfo",
    "DirtyLog",
    "GuestConfig",
    "ImageInfo",
    "Machine",
    "MachineStateError",
    "MachineStatus",
    "MemoryRegion",
    "Runstate",
    "SpareVcpu",
    "StatusCode",
    "StatusReport",
    "VcpuRunstate",
    "VcpuStatus",
    "VmConfig",
    "VmShell",
    "VmState",
    "VmStateError",
    "install_kick_handler",
    "load_config",
]
