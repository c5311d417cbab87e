"""The built-in guest programs (freestanding C, see docs/boot-abi.md) and their build."""

from .build import BUILTIN_GUESTS, GuestBuildError, guest_image

__all__ = ["BUILTIN_GUESTS", "GuestBuildError", "guest_image"]
