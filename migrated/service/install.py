"""``migrated install-units``: from ``pip install`` to units systemd can start.

It writes, under ``--root`` (default ``/``):

* ``etc/systemd/system/migrated.service``, ``migrated-vm@.service``,
  ``migrated-incoming@.service``: the templates of :mod:`migrated.service.units`
  with ``ExecStart=`` pointing at the ``migrated`` executable that runs this command
  (or ``--bin``), so units always start the installed version;
* ``etc/migrated/`` (0755) with ``vms/`` (0755) and ``tls/`` (0700), and a commented
  ``migrated.toml`` when there is none (an existing one is never touched);

then runs ``systemctl daemon-reload`` (only for ``--root /``).  It never enables or
starts anything: that is the operator's step (docs/operations.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from migrated.errors import ConfigError

__all__ = ["UNITS", "default_binary", "install_units", "render_unit"]

UNITS = ("migrated.service", "migrated-vm@.service", "migrated-incoming@.service")

DEFAULT_CONFIG = """\
# migrated host configuration (see docs/operations.md).  Every key is optional;
# an unknown key is an error that names it.

[daemon]
# listen = "0.0.0.0:7440"           # the daemon-to-daemon port (mutual TLS)
# control_group = ""                # members may use /run/migrated/migrated.sock
# incoming_ports = "49152-49215"    # receiving VM processes listen here
# incoming_address = "0.0.0.0"

[tls]
# mode = "mtls"                     # "plain" only on an isolated network
# dir = "/etc/migrated/tls"         # ca-cert.pem, server-cert.pem, server-key.pem,
#                                   # client-cert.pem, client-key.pem
allowed_peers = []                  # default deny: the other hosts' certificate names

[metrics]
# listen = "127.0.0.1:9440"         # Prometheus endpoint; off when empty
"""


def default_binary() -> str:
    """The ``migrated`` executable of this installation: next to the running Python
    (a venv or ``pip install --prefix``), else the one on ``$PATH``."""
    candidate = Path(sys.executable).parent / "migrated"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    argv0 = Path(sys.argv[0])
    if argv0.name == "migrated" and argv0.is_file():
        return str(argv0.resolve())
    found = shutil.which("migrated")
    if found:
        return found
    raise ConfigError(
        "cannot find the installed `migrated` executable", hint="pass --bin /path/to/migrated"
    )


def render_unit(name: str, binary: str) -> str:
    if not os.path.isabs(binary):
        raise ConfigError(f"--bin must be an absolute path, got {binary!r}")
    text = resources.files("migrated.service.units").joinpath(name).read_text()
    return text.replace("@MIGRATED@", binary)


def install_units(root: str = "/", binary: str | None = None, *, reload: bool = True) -> list[str]:
    """Write the units and directories; returns the paths written or created."""
    binary = binary or default_binary()
    base = Path(root)
    written: list[str] = []
    unit_dir = base / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        path = unit_dir / name
        path.write_text(render_unit(name, binary))
        path.chmod(0o644)
        written.append(str(path))
    etc = base / "etc/migrated"
    for sub, mode in ((etc, 0o755), (etc / "vms", 0o755), (etc / "tls", 0o700)):
        if not sub.exists():
            sub.mkdir(parents=True)
            written.append(str(sub))
        sub.chmod(mode)
    config = etc / "migrated.toml"
    if not config.exists():
        config.write_text(DEFAULT_CONFIG)
        config.chmod(0o644)
        written.append(str(config))
    if reload and os.path.realpath(root) == "/" and shutil.which("systemctl"):
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    return written
