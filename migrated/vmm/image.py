"""Which guest image a VM boots and where it goes (the boot ABI's load address)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrated.errors import ConfigError
from migrated.guests.build import guest_image

from .boot import IMAGE_GPA
from .config import GuestConfig

__all__ = ["ImageInfo", "load_image"]

PAGE_SIZE = 4096


@dataclass(frozen=True)
class ImageInfo:
    """Identity and placement of the image a VM was booted from."""

    name: str  # built-in name, or the file path
    sha256: str
    nbytes: int
    load_gpa: int
    entry_gpa: int

    @property
    def end_gpa(self) -> int:
        """First GPA the guest owns: the image end rounded up to 4 KiB."""
        return (self.load_gpa + self.nbytes + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "nbytes": self.nbytes,
            "load_gpa": self.load_gpa,
            "entry_gpa": self.entry_gpa,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageInfo:
        return cls(
            name=str(d["name"]),
            sha256=str(d["sha256"]),
            nbytes=int(d["nbytes"]),
            load_gpa=int(d["load_gpa"]),
            entry_gpa=int(d["entry_gpa"]),
        )


def load_image(guest: GuestConfig, ram_bytes: int) -> tuple[bytes, ImageInfo]:
    """The image bytes and their placement.  Raises ConfigError when the image file is
    unreadable, empty, does not fit in RAM, or the entry offset is outside it;
    GuestBuildError when a built-in guest cannot be built."""
    if guest.builtin is not None:
        name = guest.builtin
        data = guest_image(name).read_bytes()
    else:
        assert guest.image is not None
        name = guest.image
        try:
            data = Path(guest.image).read_bytes()
        except OSError as exc:
            raise ConfigError(f"guest.image: cannot read {guest.image}: {exc.strerror}") from exc
        if not data:
            raise ConfigError(f"guest.image: {guest.image} is empty")
        if guest.entry_offset >= len(data):
            raise ConfigError(
                f"guest.entry_offset: {guest.entry_offset:#x} is outside the {len(data)}-byte image"
            )
    info = ImageInfo(
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        nbytes=len(data),
        load_gpa=IMAGE_GPA,
        entry_gpa=IMAGE_GPA + guest.entry_offset,
    )
    if info.end_gpa + PAGE_SIZE > ram_bytes:
        raise ConfigError(
            f"memory_mib: the {len(data)}-byte image loaded at {IMAGE_GPA:#x} leaves no guest "
            f"RAM in {ram_bytes >> 20} MiB"
        )
    return data, info
