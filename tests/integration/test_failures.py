"""Failures before the switchover leave the VM running, unchanged, on the source; bad
input is refused with exit code 2 and a message naming what was wrong."""

from __future__ import annotations

import pytest

from .pair import Guest, Pair, free_port

pytestmark = [pytest.mark.kvm, pytest.mark.uffd]


def assert_source_runs_and_verifies(pair: Pair, vcpus: int) -> None:
    assert pair.source is not None and pair.source.alive(), pair.logs()
    st = pair.status(pair.src_sock)
    assert st is not None, pair.logs()
    assert st["vm"]["runstate"] == "running", st["vm"]
    assert all(v["runstate"] == "running" for v in st["vm"]["vcpus"]), st["vm"]
    pair.assert_verifies(pair.src_sock, vcpus)


def test_destination_not_listening(pair: Pair) -> None:
    pair.start_source(Guest(memory_mib=256, vcpus=1))
    pair.dest_port = free_port()
    r = pair.send("hybrid")
    assert r.returncode == 1, f"{r.returncode}: {r.stderr}\n{pair.logs()}"
    assert f"127.0.0.1:{pair.dest_port}" in r.stderr, r.stderr
    assert_source_runs_and_verifies(pair, 1)
    # The failed attempt is over: the source accepts another migration command.
    st = pair.status(pair.src_sock)
    assert st is not None and (st["migration"] or {}).get("status") in ("failed", None), st


def test_bad_destination_address(pair: Pair) -> None:
    pair.start_source(Guest(memory_mib=64, vcpus=1))
    r = pair.cli(*pair.send_args("postcopy", to="nonsense"))
    assert r.returncode == 2, f"{r.returncode}: {r.stderr}"
    assert "nonsense" in r.stderr, r.stderr
    assert_source_runs_and_verifies(pair, 1)


def test_unknown_config_key(pair: Pair) -> None:
    cfg = pair.workdir / "bad.toml"
    cfg.write_text(Guest(extra="hot_set_bananas = 3\n").toml("bad"))
    r = pair.cli("run", str(cfg), "--control", pair.src_sock, timeout=60)
    assert r.returncode == 2, f"{r.returncode}: {r.stderr}"
    assert "hot_set_bananas" in r.stderr, r.stderr
