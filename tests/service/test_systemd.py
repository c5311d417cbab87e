"""The installed units under a real systemd (see sdhost.py): readiness, status,
watchdog, journald fields, metrics, the control socket's SO_PEERCRED check and the
daemon port's mutual TLS."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import Cluster

pytestmark = [pytest.mark.systemd, pytest.mark.netns]

SCRAPE = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""


def scrape(host, url: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    out = host.sh(f"/opt/migrated/bin/python -c '{SCRAPE}' {url}").stdout
    samples: dict[str, float] = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_daemon_ready_status_watchdog_journal(cluster: Cluster) -> None:
    a = cluster.a
    a.systemctl("start", "--no-block", "migrated.service")
    # Type=notify: "activating" until READY=1, then "active" with our STATUS=.
    a.wait_for("active", lambda: a.show("migrated.service", "ActiveState")["ActiveState"]
               == "active", timeout_s=20)  # fmt: skip
    props = a.show("migrated.service", "StatusText", "ActiveEnterTimestampMonotonic", "MainPID")
    assert props["StatusText"] == "0 VMs"
    assert "Status: \"0 VMs\"" in a.systemctl("status", "--no-pager", "migrated.service",
                                                check=False)  # fmt: skip
    up = [e for e in a.journal("-u", "migrated.service")
          if "are up" in e.get("MESSAGE", "")]  # fmt: skip
    assert up, "the daemon never logged that its sockets are up"
    # Active only after the sockets were up (and READY sent right after).
    assert int(up[-1]["__MONOTONIC_TIMESTAMP"]) <= int(props["ActiveEnterTimestampMonotonic"])
    assert a.sh("test -S /run/migrated/migrated.sock", check=False).returncode == 0
    # Native journal protocol: structured fields, not a stdout stream.
    assert up[-1]["_TRANSPORT"] == "journal"
    assert up[-1]["LOGGER"] == "migrated.service.daemon"
    assert up[-1]["SYSLOG_IDENTIFIER"] == "migrated"

    # The watchdog: a frozen daemon is killed and restarted.
    pid = int(props["MainPID"])
    a.sh(f"kill -STOP {pid}")
    a.wait_for("a restarted daemon", lambda: (
        a.show("migrated.service", "MainPID", "ActiveState", "NRestarts")
    ) if int(a.show("migrated.service", "MainPID")["MainPID"]) not in (0, pid)
        and a.show("migrated.service", "ActiveState")["ActiveState"] == "active" else None,
        timeout_s=20)  # fmt: skip
    assert int(a.show("migrated.service", "NRestarts")["NRestarts"]) >= 1
    result = a.show("migrated.service", "ExecMainStatus")
    log = json.dumps(a.journal("-u", "migrated.service"))
    assert "watchdog timeout" in log.lower(), "systemd did not say the watchdog fired"
    assert result  # new main process runs


def test_control_socket_refuses_non_root(cluster: Cluster) -> None:
    a = cluster.a
    a.systemctl("start", "migrated.service")
    ok = a.sh("/opt/migrated/bin/migrated list --json")
    assert json.loads(ok.stdout)["vms"] == []
    client = (
        "setpriv --reuid=65534 --regid=65534 --clear-groups /opt/migrated/bin/python -c "
        "'import socket; s = socket.socket(socket.AF_UNIX); "
        's.connect("/run/migrated/migrated.sock"); s.sendall(b"{\\"cmd\\": \\"list\\"}\\n"); '
        "print(s.recv(4096).decode())'"
    )
    # The socket file is 0600: the kernel refuses first.
    r = a.sh(client, check=False)
    assert "Permission denied" in r.stderr
    # Even with the file opened up by mistake, SO_PEERCRED refuses and the daemon logs it.
    a.sh("chmod 666 /run/migrated/migrated.sock")
    r = a.sh(client, check=False)
    assert "permission denied: root or daemon.control_group only" in r.stdout
    refused = a.wait_for("the refusal in the journal", lambda: [
        e for e in a.journal("-u", "migrated.service")
        if "refused control client" in e.get("MESSAGE", "")])  # fmt: skip
    assert "uid 65534" in refused[-1]["MESSAGE"]
    a.sh("chmod 600 /run/migrated/migrated.sock")
