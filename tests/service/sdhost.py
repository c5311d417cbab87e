"""A "host" for the service tests: systemd 252 as PID 1 of its own PID + mount
namespace, inside its own network namespace, with migrated installed by pip.

The recipe is the one of shared/MACHINE.md, with its warning obeyed: before systemd
starts, tmpfs covers /run, /tmp and /var/tmp; /etc is an overlay on a tmpfs (so
`install-units` and the test's files never reach the machine's /etc); /var/lib,
/var/log and /opt are tmpfs; systemd boots a target of ours
(``DefaultDependencies=no``), never the default one, and sysinit.target, the
tmpfiles units and network-online.target are masked, so nothing can pull them in.
The shipped units get a drop-in with ``DefaultDependencies=no`` for the same reason.

Installation is the operator's: a venv in /opt/migrated made with Debian's python3,
``pip install`` of the wheel built from this checkout, then
``migrated install-units``.  Only migrated's dependencies come from the developer's
venv (bound read-only at /opt/deps: this machine has no index to fetch them from).

Everything is killed with the namespace's PID 1 (SIGKILL) in :meth:`Host.close`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sysconfig
import time
from pathlib import Path
from typing import Any

SYSTEMD = "/lib/systemd/systemd"
INSTALL_BIN = "/opt/migrated/bin/migrated"

TARGET = """\
[Unit]
Description=migrated test host
DefaultDependencies=no
Wants=systemd-journald.socket systemd-journald.service
"""

NO_DEFAULT_DEPS = "[Unit]\nDefaultDependencies=no\n"
MASKED = (
    "sysinit.target",
    "basic.target",
    "network-online.target",
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
)

BOOT = r"""
set -e
mount --make-rprivate /
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=755 tmpfs /opt
mkdir -p /opt/deps /opt/wheels
mount --bind "$DEPS" /opt/deps
mount -o remount,bind,ro /opt/deps
mount --bind "$WHEELS" /opt/wheels
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mkdir -p /run/.etc/up /run/.etc/work
mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/.etc/up,workdir=/run/.etc/work /etc
mount -t tmpfs -o mode=755 tmpfs /var/lib
mount -t tmpfs -o mode=755 tmpfs /var/log
mount -t tmpfs -o mode=755 tmpfs /var/cache
mount -t proc proc /proc
mkdir -p /run/systemd/system
printf '%s' "$TARGET_UNIT" > /run/systemd/system/migrated-test.target
for u in $MASKED; do ln -sf /dev/null /run/systemd/system/$u; done
for u in migrated.service migrated-vm@.service migrated-incoming@.service; do
  mkdir -p /run/systemd/system/$u.d
  printf '%s' "$NO_DEPS" > /run/systemd/system/$u.d/test.conf
done
echo "$HOSTNAME_WANTED" > /run/.hostname
export container=other
exec "$SYSTEMD" --system --unit=migrated-test.target --log-target=journal-or-kmsg --log-level=notice
"""


def systemd_usable() -> str | None:
    """None when a namespaced systemd can run here, else the reason to skip."""
    if not os.path.exists(SYSTEMD):
        return f"systemd is not installed ({SYSTEMD} missing)"
    if os.geteuid() != 0:
        return "needs root (PID + mount namespaces)"
    for tool in ("unshare", "nsenter", "ip", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    if not os.path.exists("/usr/bin/python3"):
        return "Debian's /usr/bin/python3 is missing (the installed venv uses it)"
    return None


def dev_site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


class Host:
    def __init__(self, workdir: Path, name: str, netns: str, wheels: Path) -> None:
        self.workdir, self.name, self.netns, self.wheels = workdir, name, netns, wheels
        self.log = workdir / f"{name}-systemd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    # -- lifecycle ---------------------------------------------------------------------

    def boot(self, timeout_s: float = 20) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "DEPS": dev_site_packages(),
            "WHEELS": str(self.wheels),
            "TARGET_UNIT": TARGET,
            "NO_DEPS": NO_DEFAULT_DEPS,
            "MASKED": " ".join(MASKED),
            "SYSTEMD": SYSTEMD,
            "HOSTNAME_WANTED": self.name,
        }
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns,
                 "unshare", "--pid", "--fork", "--mount", "bash", "-c", BOOT],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd of {self.name} exited:\n{self.log.read_text()}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError):
                kids = children.read_text().split()
                if kids:
                    pid = int(kids[0])
                    if os.readlink(f"/proc/{pid}/exe").endswith("systemd"):
                        self.pid = pid
                        break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"systemd of {self.name} did not start:\n{self.log.read_text()}")
        while time.monotonic() < deadline:
            r = self.sh("systemctl is-system-running", check=False)
            if r.stdout.strip() in ("running", "degraded"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"systemd of {self.name} never finished booting: {r.stdout}")

    def close(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.pid = 0

    # -- driving it ------------------------------------------------------------------------

    def sh(
        self, command: str, *, check: bool = True, input: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``sh -c command`` inside the host (all of its namespaces)."""
        r = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "--", "sh", "-c", command],
            input=input.decode() if input is not None else None,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(
                f"[{self.name}] {command!r} exited {r.returncode}\n"
                f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
            )
        return r

    def put(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        raw = data.encode() if isinstance(data, str) else data
        q = shlex.quote(path)
        self.sh(f"mkdir -p $(dirname {q}) && cat > {q} && chmod {mode:o} {q}", input=raw)

    def systemctl(self, *args: str, check: bool = True) -> str:
        r = self.sh("systemctl " + " ".join(shlex.quote(a) for a in args), check=False)
        if check and r.returncode != 0:
            unit = args[-1] if args else ""
            logs = self.sh(f"journalctl --no-pager -n 40 -u {shlex.quote(unit)}", check=False)
            raise AssertionError(
                f"[{self.name}] systemctl {' '.join(args)} exited {r.returncode}: {r.stderr}\n"
                f"--- journal of {unit} ---\n{logs.stdout}"
            )
        return r.stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", "-p", ",".join(props), unit)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *match: str) -> list[dict[str, Any]]:
        out = self.sh("journalctl --no-pager --all -o json " + " ".join(map(shlex.quote, match)),
                      check=False).stdout  # fmt: skip
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_for(
        self, what: str, predicate: Any, timeout_s: float = 30, every_s: float = 0.2
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(every_s)
        logs = self.sh("journalctl --no-pager -n 60 -u 'migrated*'", check=False).stdout
        raise AssertionError(
            f"[{self.name}] timed out waiting for {what} (last: {last!r})\n"
            f"--- journal of migrated* ---\n{logs}"
        )

    def install(self) -> str:
        """The operator's install: venv, pip install, install-units.  Returns the
        output of install-units."""
        self.sh(
            "/usr/bin/python3 -m venv /opt/migrated && "
            "echo /opt/deps > /opt/migrated/lib/python3.11/site-packages/deps.pth && "
            "/opt/migrated/bin/pip install -q --no-index --no-deps /opt/wheels/migrated-*.whl",
            timeout=180,
        )
        return self.sh(f"{INSTALL_BIN} install-units").stdout

    def python(self, code: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sh(f"/opt/migrated/bin/python -c {shlex.quote(code)}", check=check)
