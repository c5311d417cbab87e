"""The shipped units: in sync with the package's templates, clean under
``systemd-analyze verify``, and their exposure under ``systemd-analyze security``;
``install-units`` into a staging root."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from migrated.service.install import UNITS, install_units, render_unit

ROOT = Path(__file__).resolve().parents[2]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def test_shipped_units_match_templates() -> None:
    """systemd/ holds the units as installed by `pip install` as root (/usr/local/bin)."""
    for name in UNITS:
        assert (ROOT / "systemd" / name).read_text() == render_unit(
            name, "/usr/local/bin/migrated"
        ), f"systemd/{name} is stale: regenerate it from migrated/service/units/{name}"


def test_install_units_into_a_root(tmp_path: Path) -> None:
    written = install_units(str(tmp_path), "/opt/x/bin/migrated", reload=False)
    unit = (tmp_path / "etc/systemd/system/migrated-vm@.service").read_text()
    assert "ExecStart=/opt/x/bin/migrated vm %i" in unit
    assert (tmp_path / "etc/migrated/tls").stat().st_mode & 0o777 == 0o700
    config = tmp_path / "etc/migrated/migrated.toml"
    assert str(config) in written
    config.write_text("# mine\n")
    install_units(str(tmp_path), "/opt/x/bin/migrated", reload=False)
    assert config.read_text() == "# mine\n"  # never overwritten


@needs_analyze
def test_verify_clean(tmp_path: Path) -> None:
    binary = str(Path(sys.executable).parent / "migrated")
    unit_dir = tmp_path / "etc/systemd/system"
    install_units(str(tmp_path), binary, reload=False)
    for name in UNITS:
        r = subprocess.run([ANALYZE, "verify", "--man=no", str(unit_dir / name)],
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), (name, r.stdout, r.stderr)


@needs_analyze
def test_security_exposure(tmp_path: Path) -> None:
    binary = str(Path(sys.executable).parent / "migrated")
    install_units(str(tmp_path), binary, reload=False)
    scores = {}
    for name in UNITS:
        path = tmp_path / "etc/systemd/system" / name
        r = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(path)],
                           capture_output=True, text=True)  # fmt: skip
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", r.stdout)
        assert m, r.stdout[-2000:] + r.stderr
        scores[name] = (float(m.group(1)), m.group(2))
    print("systemd-analyze security --offline=yes:", scores)
    assert scores["migrated.service"][0] <= 3.0, scores
    for vm_unit in ("migrated-vm@.service", "migrated-incoming@.service"):
        assert scores[vm_unit][0] <= 4.5, scores  # it needs /dev/kvm and userfaultfd
