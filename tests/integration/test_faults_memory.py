"""A destination that cannot hold the guest refuses it before the switchover.

The receiver runs inside a memory cgroup of our own (tests/integration/faults.py,
MemoryCgroup) whose limit is smaller than the guest: the migration must fail at Setup
with a message naming the sizes and the limit, the source VM keeps running and
verifies, and nothing in the cgroup was OOM-killed.

These run on loopback, not in network namespaces: ``ip netns exec`` remounts /sys in
a new mount namespace, which hides /sys/fs/cgroup from the process it starts, so the
receiver could not see its own cgroup's limit there.  The same cgroup around
``migrated run`` refuses to boot the guest.  A cgroup that is large enough changes
nothing (the control case).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .faults import (
    GUEST,
    CgroupUnavailable,
    MemoryCgroup,
    RunWatch,
    assert_failure_message,
    assert_runs_only_on,
    expect_completed_on_destination,
    failure_text,
    settle_destination_after_abort,
)
from .pair import MIGRATED, Guest, Pair

pytestmark = [pytest.mark.faults, pytest.mark.kvm, pytest.mark.uffd]

MiB = 1 << 20
BIG = Guest(memory_mib=256, vcpus=1, hot_set_mib=8, writes_per_s=20000)


def cgroup(limit_mib: int) -> Iterator[MemoryCgroup]:
    try:
        cg = MemoryCgroup(limit_mib * MiB)
    except CgroupUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield cg
    finally:
        cg.remove()


@pytest.fixture
def cg_160m() -> Iterator[MemoryCgroup]:
    yield from cgroup(160)


@pytest.fixture
def cg_512m() -> Iterator[MemoryCgroup]:
    yield from cgroup(512)


@pytest.mark.parametrize("mode", ["postcopy", "hybrid"])
def test_destination_cgroup_smaller_than_guest(
    cg_160m: MemoryCgroup, pair: Pair, mode: str
) -> None:
    pair.start_dest(wrap=cg_160m.wrap())
    assert pair.dest is not None and cg_160m.procs() == [pair.dest.pid]
    pair.start_source(BIG)
    with RunWatch(pair) as watch:
        # (A short recovery timeout: an engine without admission loses the destination
        # to the OOM killer after the switchover and would otherwise wait 300 s.)
        r = pair.send(mode, "--max-precopy-rounds", "2", "--recovery-timeout", "5",
                         timeout=120)  # fmt: skip
        text = failure_text(r)
        assert r.returncode == 1, f"send exited {r.returncode}, expected 1\n{text}\n" + (
            pair.logs()
        )
        assert cg_160m.oom_kills() == 0, "the destination was OOM-killed instead of refusing"
        assert_failure_message(text, phase="setup", side="destination",
                               reason=("memory", "cannot hold"), next_cmd=("send",))  # fmt: skip
        assert "256.0 MiB" in text and "cgroup" in text, text
        assert cg_160m.name in text, f"the limit that binds is not named: {text}"
        # Refused before the switchover: the source never paused its VM.
        assert not {"switchover", "device", "ready"} & set(r.states()), r.states()
        assert_runs_only_on(pair, "source", BIG.vcpus)
        settle_destination_after_abort(pair, allow_idle=True)
        watch.assert_destination_never_ran()


def test_destination_cgroup_large_enough(cg_512m: MemoryCgroup, pair: Pair) -> None:
    """The control case: the same harness with room for the guest migrates it."""
    pair.start_dest(wrap=cg_512m.wrap())
    pair.start_source(GUEST)
    with RunWatch(pair) as watch:
        r = pair.send("postcopy", timeout=120)
        expect_completed_on_destination(pair, r, watch)
    assert cg_512m.oom_kills() == 0
    assert cg_512m.usage_bytes() > GUEST.memory_mib * MiB  # the guest's RAM was charged here


def test_run_refuses_a_guest_its_cgroup_cannot_hold(cg_160m: MemoryCgroup, workdir: Path) -> None:
    cfg = workdir / "big.toml"
    cfg.write_text(BIG.toml("big"))
    p = subprocess.Popen(
        [*cg_160m.wrap(), *MIGRATED, "run", str(cfg), "--control", str(workdir / "big.sock")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir,
    )  # fmt: skip
    try:
        _out, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        _out, err = p.communicate()
        raise AssertionError(
            f"`migrated run` booted a guest its cgroup cannot hold: {err}"
        ) from None
    # Refused (exit 1 or 2: the error tree decides), not OOM-killed (-9).
    assert p.returncode in (1, 2), f"exit {p.returncode} (oom kills {cg_160m.oom_kills()}): {err}"
    assert "256.0 MiB" in err and cg_160m.name in err, err
    assert cg_160m.oom_kills() == 0
