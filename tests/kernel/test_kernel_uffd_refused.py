"""The error a process gets when the kernel refuses it a userfaultfd.

Not marked ``uffd``: it needs the kernel to *refuse*, which only a host with
``vm.unprivileged_userfaultfd=0`` can be made to do, so skipping elsewhere is expected."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_unprivileged_open_error_names_the_remedy() -> None:
    """A process that may not create a userfaultfd (no /dev/userfaultfd it can use, no
    CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=0) gets EPERM with the remedy: the real
    syscall refuses, in a child with its own mount namespace and a reduced bounding set."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "setpriv")):
        pytest.skip("needs root, unshare and setpriv to build an unprivileged child")
    if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() != "0":
        pytest.skip("vm.unprivileged_userfaultfd=1 lets every process create one")
    code = (
        "import errno, sys\n"
        "from migrated.kernel.uffd import Userfaultfd\n"
        "try:\n"
        "    Userfaultfd.open()\n"
        "except OSError as exc:\n"
        "    print(errno.errorcode[exc.errno], exc.strerror)\n"
        "    sys.exit(0)\n"
        "sys.exit('opened a userfaultfd although it should not be allowed to')\n"
    )
    script = (
        "mount --bind /dev/null /dev/userfaultfd && "
        f"exec setpriv --bounding-set -sys_ptrace {shlex.quote(sys.executable)} -c "
        f"{shlex.quote(code)}"
    )
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("EPERM "), r.stdout
    assert "vm.unprivileged_userfaultfd=1" in r.stdout and "CAP_SYS_PTRACE" in r.stdout
