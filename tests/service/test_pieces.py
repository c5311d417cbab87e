"""Fast tests of the service's parts with real sockets and files: host configuration,
ownership records, sd_notify datagrams, the journal encoding, the stderr format, the
status line, the local control socket's credentials check."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from pathlib import Path

import pytest

from migrated.errors import ConfigError
from migrated.log import EVENT_MESSAGE_IDS
from migrated.service.hostconfig import parse_host_config
from migrated.service.journal import StderrFormatter, encode_fields, record_fields
from migrated.service.lines import exchange
from migrated.service.localctl import LocalControl, peer_credentials
from migrated.service.notify import Notifier
from migrated.service.ownership import Ownership
from migrated.service.vmunit import describe


def test_host_config_defaults_and_errors() -> None:
    cfg = parse_host_config({})
    assert cfg.daemon.listen == ("0.0.0.0", 7440) and cfg.tls.mode == "mtls"
    assert cfg.metrics_listen is None and cfg.tls.allowed_peers == ()
    assert cfg.control_path("web1") == "/run/migrated/vm/web1/control.sock"
    cfg = parse_host_config({
        "daemon": {"listen": "[::1]:9", "incoming_ports": "5-6"},
        "tls": {"allowed_peers": ["b"]},
        "metrics": {"listen": "127.0.0.1:1"},
    })  # fmt: skip
    assert cfg.daemon.listen == ("::1", 9) and cfg.daemon.incoming_ports == (5, 6)
    assert cfg.metrics_listen == ("127.0.0.1", 1)
    for data, key in (
        ({"daemon": {"lisen": "x"}}, "daemon.lisen: unknown key"),
        ({"tls": {"allowed": []}}, "tls.allowed: unknown key"),
        ({"extra": {}}, "extra: unknown key"),
        ({"tls": {"mode": "tls"}}, "tls.mode"),
        ({"tls": {"allowed_peers": "b"}}, "tls.allowed_peers"),
        ({"daemon": {"incoming_ports": "9-5"}}, "daemon.incoming_ports"),
        ({"daemon": {"listen": "h:99999"}}, "daemon.listen"),
        ({"metrics": {"listen": "nohost"}}, "metrics.listen"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_host_config(data)
        assert str(err.value).startswith(key), (str(err.value), key)


def test_ownership_guard(tmp_path: Path) -> None:
    own = Ownership(str(tmp_path / "vms" / "web1.json"))
    own.check_boot("web1")  # no record: boots
    own.write("outgoing", "10.0.0.2:49152")
    with pytest.raises(ConfigError, match=r"was migrating to 10\.0\.0\.2:49152") as err:
        own.check_boot("web1")
    assert err.value.exit_code == 2
    own.write("away", "10.0.0.2:49152")
    with pytest.raises(ConfigError, match=r"migrated to 10\.0\.0\.2"):
        own.check_boot("web1")
    own.write("here", "incoming")
    own.check_boot("web1")
    own.path.write_text("{broken")
    with pytest.raises(ConfigError):  # unreadable means in doubt, never absent
        own.check_boot("web1")
    own.clear()
    own.check_boot("web1")


def test_notify_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    n = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000",
                                   "WATCHDOG_PID": str(os.getpid())})  # fmt: skip
    assert n.watchdog_interval_s == 1.5
    n.ready("2 VMs")
    n.status("2 VMs")  # unchanged: not sent again
    n.status("3 VMs,\n1 migrating")
    n.watchdog()
    n.stopping()
    got = [server.recv(4096).decode() for _ in range(4)]
    assert got == ["READY=1\nSTATUS=2 VMs\n", "STATUS=3 VMs, 1 migrating\n", "WATCHDOG=1\n",
                   "STOPPING=1\n"]  # fmt: skip
    assert Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1",
                                      "WATCHDOG_PID": "1"}).watchdog_interval_s is None  # fmt: skip
    silent = Notifier.from_environment({})
    assert not silent.enabled and not silent.send(ready=1)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind("\0migrated-test-notify")
    Notifier("@migrated-test-notify").ready()
    assert abstract.recv(100) == b"READY=1\n"


def test_journal_encoding_and_fields() -> None:
    data = encode_fields({"MESSAGE": "a\nb", "PRIORITY": "6"})
    assert data == b"MESSAGE\n" + struct.pack("<Q", 3) + b"a\nb\n" + b"PRIORITY=6\n"
    rec = logging.LogRecord("migrated.x", logging.WARNING, "/f.py", 7, "done", None, None)
    rec.migrated_vm, rec.migrated_session, rec.migrated_phase = "web1", "ab", "completed"
    rec.migrated_event = "completed"
    fields = record_fields(rec, "done", "migrated")
    assert fields["MESSAGE_ID"] == EVENT_MESSAGE_IDS["completed"]
    assert (fields["MIGRATED_VM"], fields["MIGRATED_SESSION"], fields["PRIORITY"]) == (
        "web1",
        "ab",
        "4",
    )
    text = StderrFormatter().format(rec)
    assert text == "migrated: warning [vm=web1 session=ab phase=completed event=completed] done"


def test_status_line() -> None:
    assert describe({"vm": {"name": "web1", "runstate": "running"}}) == "VM web1 running"
    line = describe({"vm": {"name": "web1", "runstate": "paused"},
                     "migration": {"role": "source", "status": "postcopy-active",
                                   "total_pages": 200, "pages_remaining": 74}})  # fmt: skip
    assert line == "VM web1 paused, migration (source) postcopy-active 63 %"


async def test_local_control_credentials(tmp_path: Path) -> None:
    path = str(tmp_path / "d.sock")

    async def hello(req, emit, caller):  # type: ignore[no-untyped-def]
        return {"uid": caller.uid, "pid": caller.pid}

    ctl = LocalControl(path, "", {"hello": hello})
    await ctl.start()
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        r, w = await asyncio.open_unix_connection(path)
        pid, uid, _gid, _groups = peer_credentials(w.get_extra_info("socket"))
        assert pid == os.getpid() and uid == os.geteuid()
        results = [m async for m in exchange(r, w, "hello")]
        assert results[-1]["result"] == {"uid": os.geteuid(), "pid": os.getpid()}
        assert not ctl.allowed(1000, 1000, ()) and ctl.allowed(0, 0, ())
        # A live listener is never replaced; a non-socket is never unlinked.
        with pytest.raises(ConfigError, match="another daemon"):
            await LocalControl(path, "", {}).start()
    finally:
        await ctl.close()
    Path(path).write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        await LocalControl(path, "", {}).start()
    assert json.dumps(Path(path).read_text())
