"""The installed units under a real systemd (see sdhost.py): readiness, status,
watchdog, journald fields, metrics, the control socket's SO_PEERCRED check and the
daemon port's mutual TLS."""

from __future__ import annotations

import json

import pytest

from migrated.log import EVENT_MESSAGE_IDS

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
    # Type=notify: "activating" until READY=1, which comes once the sockets are up.
    # Sample the state and the control socket until active: never active without it.
    samples = a.sh(
        "systemctl start --no-block migrated.service; for i in $(seq 1 1000); do "
        "s=$(systemctl show -p ActiveState --value migrated.service); "
        "[ -S /run/migrated/migrated.sock ] && k=1 || k=0; echo $s $k; "
        "[ $s = active ] && break; done"
    ).stdout.split("\n")
    seen = [line.split() for line in samples if line.strip()]
    assert seen[-1] == ["active", "1"], seen[-5:]
    assert ["activating", "0"] in seen, "never saw the unit wait for READY"
    assert all(state != "active" or sock == "1" for state, sock in seen)
    props = a.show("migrated.service", "StatusText", "MainPID")
    assert props["StatusText"] == "0 VMs"
    assert 'Status: "0 VMs"' in a.systemctl("status", "--no-pager", "migrated.service",
                                              check=False)  # fmt: skip
    up = [e for e in a.journal("-u", "migrated.service")
          if "are up" in e.get("MESSAGE", "")]  # fmt: skip
    assert up, "the daemon never logged that its sockets are up"
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
        's.connect("/run/migrated/migrated.sock"); '  # it answers first: nothing is read
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


JOURNAL_PROBE = """\
import logging
from migrated.log import migration_logger
from migrated.service.journal import setup_logging
handler = setup_logging("info")
print(type(handler).__name__, flush=True)
log = migration_logger("migrated.probe", vm="web9", session="00ff00ff", phase=lambda: "active")
log.event("switchover", "probe switchover of %s", "web9")
log.info("big " + "x" * 300000)
logging.getLogger("migrated.probe").warning("two\\nlines")
"""


def test_journal_fields(cluster: Cluster) -> None:
    """The handler, run as a unit: JOURNAL_STREAM detected, native protocol used,
    structured fields and MESSAGE_ID present, a 300 kB entry sent through a memfd."""
    a = cluster.a
    a.put("/run/journal_probe.py", JOURNAL_PROBE)
    a.put("/run/systemd/system/journal-probe.service",
          "[Unit]\nDefaultDependencies=no\n[Service]\nType=oneshot\n"
          "ExecStart=/opt/migrated/bin/python /run/journal_probe.py\n")  # fmt: skip
    a.systemctl("daemon-reload")
    a.systemctl("start", "journal-probe.service")
    entries = a.wait_for("the probe's entries", lambda: (lambda e: e if len(e) >= 4 else None)(
        a.journal("_SYSTEMD_UNIT=journal-probe.service")))  # fmt: skip
    assert any(e.get("MESSAGE") == "JournalHandler" for e in entries)  # stdout still captured
    switch = next(e for e in entries if e.get("MESSAGE", "").startswith("probe switchover"))
    assert switch["_TRANSPORT"] == "journal"
    assert switch["MESSAGE_ID"] == EVENT_MESSAGE_IDS["switchover"]
    assert (switch["MIGRATED_VM"], switch["MIGRATED_SESSION"], switch["MIGRATED_PHASE"]) == (
        "web9",
        "00ff00ff",
        "active",
    )
    assert switch["PRIORITY"] == "6" and switch["LOGGER"] == "migrated.probe"
    big = [e for e in entries if str(e.get("MESSAGE", "")).startswith("big ")]
    assert big and len(big[0]["MESSAGE"]) == 300004
    two = [e for e in entries if e.get("PRIORITY") == "4"]
    assert two and two[0]["MESSAGE"] == "two\nlines"
    by_id = a.journal(f"MESSAGE_ID={EVENT_MESSAGE_IDS['switchover']}", "MIGRATED_VM=web9")
    assert len(by_id) == 1
