"""Fixtures for the paired-VM integration tests (see pair.py).

Every process a test starts is stopped by the fixture (SIGTERM, then SIGKILL), and every
namespace is deleted, also when the test fails.  The work directory (logs of every
process) is kept when a test fails and its path is printed in the report.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .pair import Netns, Pair


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    if rep.failed:
        item.stash.setdefault(_FAILED, True)
    return rep


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="migrated-itest-"))
    yield d
    if request.node.stash.get(_FAILED, False) or os.environ.get("MIGRATED_KEEP_WORKDIR") == "1":
        print(f"\nintegration work dir kept: {d}")
        return
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pair(workdir: Path) -> Iterator[Pair]:
    p = Pair(workdir)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def netns() -> Iterator[Netns]:
    net = Netns()
    try:
        net.create()
        yield net
    finally:
        net.delete()


@pytest.fixture
def netpair(workdir: Path, netns: Netns) -> Iterator[Pair]:
    p = Pair(workdir, netns)
    try:
        yield p
    finally:
        p.close()  # before the namespaces go (fixture order)
