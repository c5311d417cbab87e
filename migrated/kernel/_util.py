"""Shared helpers of the kernel layer: turning C return codes into OSError."""

from __future__ import annotations

import os
from typing import Any

from ._native import ffi, lib

__all__ = ["check", "ffi", "ioctl", "lib", "raise_errno"]


def raise_errno(errno_value: int, what: str) -> None:
    """Raise the OSError subclass for ``errno_value`` with a sentence naming ``what``."""
    raise OSError(errno_value, f"{what}: {os.strerror(errno_value)}")


def check(rc: int, what: str) -> int:
    """For helpers that return ``-errno`` on failure: raise, or return ``rc``."""
    if rc < 0:
        raise_errno(-rc, what)
    return rc


def ioctl(fd: int, request: int, arg: Any, what: str) -> int:
    """``ioctl(2)``; raise OSError naming ``what`` on failure, else return the result.

    ``arg`` is a cffi pointer or an int.  The call releases the GIL.
    """
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    rc = lib.ioctl(fd, ffi.cast("unsigned long", request), arg)
    if rc < 0:
        raise_errno(ffi.errno, what)
    return int(rc)
