"""The host configuration, ``/etc/migrated/migrated.toml``: TOML -> frozen records.

Every key is checked; an unknown key or a bad value is a :class:`ConfigError` whose
message starts with the key path (``daemon.listen: ...``).  Every key has a default,
so an empty file is a valid configuration (mutual TLS, metrics off)::

    [daemon]
    listen = "0.0.0.0:7440"            # the daemon-to-daemon port (mutual TLS)
    control_socket = "/run/migrated/migrated.sock"
    control_group = ""                 # members may use the control socket (and root)
    vm_dir = "/etc/migrated/vms"       # NAME.toml: the VMs this host boots
    state_dir = "/var/lib/migrated"    # where each VM's ownership record lives
    runtime_dir = "/run/migrated"      # vm/NAME/control.sock, incoming/NAME.env
    incoming_ports = "49152-49215"     # receiving VM processes listen here (libvirt's range)
    incoming_address = "0.0.0.0"       # and bind this address
    systemctl = "systemctl"
    log_level = "info"

    [tls]
    mode = "mtls"                      # or "plain": no encryption (warned at start)
    dir = "/etc/migrated/tls"          # QEMU's layout, see migrated.service.tls
    allowed_peers = []                 # default deny: list the other hosts' names
    server_name = ""                   # name to verify instead of the dialled address

    [metrics]
    listen = ""                        # e.g. "127.0.0.1:9440"; empty: off
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrated.errors import ConfigError

from .tls import TlsSettings

__all__ = ["DEFAULT_PATH", "DaemonSettings", "HostConfig", "load_host_config", "parse_host_config"]

DEFAULT_PATH = "/etc/migrated/migrated.toml"
DEFAULT_PORT = 7440


@dataclass(frozen=True)
class DaemonSettings:
    listen: tuple[str, int] = ("0.0.0.0", DEFAULT_PORT)
    control_socket: str = "/run/migrated/migrated.sock"
    control_group: str = ""
    vm_dir: str = "/etc/migrated/vms"
    state_dir: str = "/var/lib/migrated"
    runtime_dir: str = "/run/migrated"
    incoming_ports: tuple[int, int] = (49152, 49215)
    incoming_address: str = "0.0.0.0"
    systemctl: str = "systemctl"
    log_level: str = "info"


@dataclass(frozen=True)
class HostConfig:
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    metrics_listen: tuple[str, int] | None = None
    path: str = ""

    def control_path(self, vm: str) -> str:
        return f"{self.daemon.runtime_dir}/vm/{vm}/control.sock"

    def vm_config_path(self, vm: str) -> str:
        return f"{self.daemon.vm_dir}/{vm}.toml"

    def state_path(self, vm: str) -> str:
        return f"{self.daemon.state_dir}/vms/{vm}.json"


def split_address(text: str, key: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (``HOST`` alone when a default port is given)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or "]" in port_text:
        if default_port is None:
            raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
        host, port_text = text, str(default_port)
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT with a port 1..65535, got {text!r}")
    return host, int(port_text)


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table")
    return value


def _unknown(table: dict[str, Any], known: set[str], prefix: str) -> None:
    for k in table:
        if k not in known:
            raise ConfigError(f"{prefix}{k}: unknown key (known: {', '.join(sorted(known))})")


def _str(table: dict[str, Any], key: str, prefix: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{prefix}{key}: expected a string, got {value!r}")
    return value


def parse_host_config(data: dict[str, Any], path: str = "") -> HostConfig:
    _unknown(data, {"daemon", "tls", "metrics"}, "")
    d, t, m = _table(data, "daemon"), _table(data, "tls"), _table(data, "metrics")
    base = DaemonSettings()
    _unknown(d, set(DaemonSettings.__dataclass_fields__), "daemon.")
    listen = split_address(
        _str(d, "listen", "daemon.", f"0.0.0.0:{DEFAULT_PORT}"), "daemon.listen", DEFAULT_PORT
    )
    ports_text = _str(d, "incoming_ports", "daemon.", "49152-49215")
    lo, sep, hi = ports_text.partition("-")
    if not (lo.isdigit() and (not sep or hi.isdigit())):
        raise ConfigError(f"daemon.incoming_ports: expected FIRST-LAST, got {ports_text!r}")
    ports = (int(lo), int(hi or lo))
    if not 0 < ports[0] <= ports[1] < 65536:
        raise ConfigError(f"daemon.incoming_ports: bad range {ports_text!r}")
    level = _str(d, "log_level", "daemon.", "info")
    if level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"daemon.log_level: expected debug, info, warning or error: {level!r}")
    daemon = DaemonSettings(
        listen=listen,
        control_socket=_str(d, "control_socket", "daemon.", base.control_socket),
        control_group=_str(d, "control_group", "daemon.", base.control_group),
        vm_dir=_str(d, "vm_dir", "daemon.", base.vm_dir),
        state_dir=_str(d, "state_dir", "daemon.", base.state_dir),
        runtime_dir=_str(d, "runtime_dir", "daemon.", base.runtime_dir),
        incoming_ports=ports,
        incoming_address=_str(d, "incoming_address", "daemon.", base.incoming_address),
        systemctl=_str(d, "systemctl", "daemon.", base.systemctl),
        log_level=level.lower(),
    )
    _unknown(t, {"mode", "dir", "allowed_peers", "server_name"}, "tls.")
    peers = t.get("allowed_peers", [])
    if not isinstance(peers, list) or not all(isinstance(p, str) and p for p in peers):
        raise ConfigError(f"tls.allowed_peers: expected a list of names, got {peers!r}")
    mode = _str(t, "mode", "tls.", "mtls")
    if mode not in ("mtls", "plain"):
        raise ConfigError(f'tls.mode: expected "mtls" or "plain", got {mode!r}')
    tls = TlsSettings(
        mode=mode,
        directory=_str(t, "dir", "tls.", "/etc/migrated/tls"),
        allowed_peers=tuple(peers),
        server_name=_str(t, "server_name", "tls.", "") or None,
    )
    _unknown(m, {"listen"}, "metrics.")
    metrics_text = _str(m, "listen", "metrics.", "")
    metrics = split_address(metrics_text, "metrics.listen") if metrics_text else None
    return HostConfig(daemon=daemon, tls=tls, metrics_listen=metrics, path=path)


def load_host_config(path: str = DEFAULT_PATH) -> HostConfig:
    """Read and check the file; a missing file is an error naming it."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file", hint="create it with `migrated install-units`"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_host_config(data, path)
