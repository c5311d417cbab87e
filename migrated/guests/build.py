"""Builds the built-in guest images from the sources shipped in this package.

``guest_image(name)`` compiles on demand with the machine's gcc and objcopy into a cache
directory (``$XDG_CACHE_HOME/migrated/guests``, else ``~/.cache/migrated/guests``), keyed
by a hash of the sources and the build flags, so a changed source is rebuilt and an
unchanged one is never.  Builds write to a temporary name and rename into place, so
concurrent builders (two test processes) cannot see a half-written image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from migrated.errors import GuestBuildError

__all__ = ["BUILTIN_GUESTS", "GuestBuildError", "cache_dir", "guest_image"]

#: Built-in guest name -> the sources it is built from (in this package).
_SOURCES: dict[str, tuple[str, ...]] = {
    "memstress": ("entry.S", "memstress.c", "guest.h", "guest.ld"),
}
#: ``idle`` is memstress with a tiny, slow hot set (parameters chosen by the VMM config).
_ALIASES = {"idle": "memstress"}

BUILTIN_GUESTS: frozenset[str] = frozenset(_SOURCES) | frozenset(_ALIASES)

_CFLAGS = (
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-no-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-O2",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    # Keeps gcc from turning loops into memset/memcpy calls nobody provides.
    "-fno-tree-loop-distribute-patterns",
    "-fcf-protection=none",
    "-mcmodel=small",
    "-Wall",
    "-Wextra",
    "-Wl,--build-id=none",
)


def cache_dir() -> Path:
    """The directory holding built guest images."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "migrated" / "guests"


def _require_tool(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise GuestBuildError(
            f"cannot build the built-in guests: `{tool}` was not found on PATH",
            hint="install gcc and binutils (Debian: apt-get install gcc binutils)",
        )
    return path


def guest_image(name: str) -> Path:
    """The flat binary image of built-in guest ``name``, built if not cached yet.

    Raises :class:`GuestBuildError` for an unknown name, a missing gcc/objcopy, or a
    failed compile (the compiler's output is in the message).
    """
    target = _ALIASES.get(name, name)
    if target not in _SOURCES:
        known = ", ".join(sorted(BUILTIN_GUESTS))
        raise GuestBuildError(f"unknown built-in guest {name!r} (known: {known})")
    package = resources.files(__package__)
    sources = {fname: package.joinpath(fname).read_bytes() for fname in _SOURCES[target]}
    digest = hashlib.sha256()
    for fname in sorted(sources):
        digest.update(fname.encode() + b"\0" + sources[fname] + b"\0")
    digest.update("\0".join(_CFLAGS).encode())
    out_dir = cache_dir()
    image = out_dir / f"{target}-{digest.hexdigest()[:16]}.bin"
    if image.exists():
        return image

    gcc = _require_tool("gcc")
    objcopy = _require_tool("objcopy")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"build-{target}-", dir=out_dir) as tmp:
        work = Path(tmp)
        for fname, data in sources.items():
            (work / fname).write_bytes(data)
        compile_units = [f for f in sources if f.endswith((".c", ".S"))]
        elf = work / f"{target}.elf"
        cmd = [gcc, *_CFLAGS, "-T", "guest.ld", "-o", str(elf), *compile_units]
        _run(cmd, work, target)
        _run([objcopy, "-O", "binary", str(elf), str(work / "image.bin")], work, target)
        # Keep the ELF next to the image: its symbols explain a crash's RIP.
        os.replace(elf, image.with_suffix(".elf"))
        os.replace(work / "image.bin", image)
    return image


def _run(cmd: list[str], cwd: Path, target: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestBuildError(
            f"building guest {target!r} failed: {' '.join(cmd)}\n{proc.stderr.strip()}",
            hint="the guest sources or the toolchain are broken; this is a bug in migrated",
        )
