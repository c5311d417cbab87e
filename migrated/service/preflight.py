"""Pre-flight checks: say exactly what the host lacks before anything starts."""

from __future__ import annotations

import os

from migrated.errors import PreflightError

__all__ = ["check_host"]


def check_host(*, need_uffd: bool) -> None:
    """Raise PreflightError naming the missing piece and how to fix it."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        raise PreflightError(
            f"/dev/kvm is not usable: {exc.strerror}",
            hint="load the kvm module (kvm_intel/kvm_amd) and give this user access to "
            "/dev/kvm (group kvm), or run as root",
        ) from exc
    if need_uffd:
        from migrated.kernel import Userfaultfd

        try:
            Userfaultfd.open().close()
        except OSError as exc:
            raise PreflightError(
                f"userfaultfd is not usable: {exc}",
                hint="run as root, give access to /dev/userfaultfd, or set "
                "`sysctl vm.unprivileged_userfaultfd=1`",
            ) from exc
