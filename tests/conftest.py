"""Test tiers and the rule that KVM/userfaultfd tests never skip where they can run.

Markers: ``kvm`` (needs /dev/kvm), ``uffd`` (needs userfaultfd), ``netns`` (needs
``ip netns``), ``slow``.  When the host can run them, a skipped ``kvm`` or ``uffd``
test fails the session if ``MIGRATED_REQUIRE_KVM=1`` (set by the README's test
command and ``.ci/run``): a green run must mean the kernel paths were exercised.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache

import pytest


@cache
def kvm_usable() -> str | None:
    """None when usable, else the reason."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm not usable: {exc.strerror}"
    os.close(fd)
    return None


@cache
def uffd_usable() -> str | None:
    try:
        from migrated.kernel import Userfaultfd

        Userfaultfd.open().close()
    except OSError as exc:
        return f"userfaultfd not usable: {exc}"
    return None


@cache
def netns_usable() -> str | None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 for network namespaces"
    name = f"migrated-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


_PROBES = {"kvm": kvm_usable, "uffd": uffd_usable, "netns": netns_usable}
_skipped_required: list[str] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name, probe in _PROBES.items():
        if item.get_closest_marker(name):
            reason = probe()
            if reason:
                pytest.skip(reason)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # pytest reports an xfailed test as skipped (with ``wasxfail``): it ran, so it
    # does not count here.
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and ("kvm" in report.keywords or "uffd" in report.keywords)
    ):
        _skipped_required.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("MIGRATED_REQUIRE_KVM") != "1" or not _skipped_required:
        return
    if kvm_usable() is None and uffd_usable() is None:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"ERROR: {len(_skipped_required)} KVM/userfaultfd test(s) were skipped although "
                "/dev/kvm and userfaultfd are usable here: " + ", ".join(_skipped_required[:5]),
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
