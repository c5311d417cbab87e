"""``--control`` pointing at the wrong thing: a config file is never deleted, a live
process's socket is never taken over (the message names the PID holding it), and the
first VM stays manageable."""

from __future__ import annotations

import pytest

from .faults import GUEST
from .pair import Pair

pytestmark = [pytest.mark.faults, pytest.mark.kvm, pytest.mark.uffd]


def test_control_pointing_at_the_config_file(pair: Pair) -> None:
    cfg = pair.workdir / "vm.toml"
    text = GUEST.toml("precious")
    cfg.write_text(text)
    r = pair.cli("run", str(cfg), "--control", str(cfg), timeout=60)
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr}"
    assert "not a socket" in r.stderr and str(cfg) in r.stderr, r.stderr
    assert cfg.read_text() == text, "the config file was changed"


def test_run_with_a_live_source_socket(pair: Pair) -> None:
    pair.start_source(GUEST)
    assert pair.source is not None
    cfg = pair.workdir / "other.toml"
    cfg.write_text(GUEST.toml("other"))
    r = pair.cli("run", str(cfg), "--control", pair.src_sock, timeout=60)
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr}"
    assert f"PID {pair.source.pid}" in r.stderr, r.stderr
    assert "migrated stop --control" in r.stderr, r.stderr
    st = pair.status(pair.src_sock)
    assert st is not None and st["vm"]["name"] == "itest", st
    pair.assert_verifies(pair.src_sock, GUEST.vcpus)


def test_recv_with_a_live_destination_socket(pair: Pair) -> None:
    pair.start_dest()
    assert pair.dest is not None
    r = pair.cli("recv", "--listen", "127.0.0.1:0", "--control", pair.dst_sock, timeout=60)
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr}"
    assert f"PID {pair.dest.pid}" in r.stderr, r.stderr
    # The first receiver still works: a VM migrates into it.
    pair.start_source(GUEST)
    res = pair.send("postcopy", timeout=120)
    assert res.returncode == 0, res.stderr + pair.logs()
    pair.assert_verifies(pair.dst_sock, GUEST.vcpus)
