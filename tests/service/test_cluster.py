"""Two hosts, two daemons under systemd: a VM migrates from one to the other and
back through the daemons (mutual TLS between them), the daemons restart in the middle
of postcopy without harm, the guest verifies on arrival, the source refuses to boot a
second copy, and journald and the metrics endpoint tell the story.

The migration channels themselves (MAIN/URGENT/BULK) are plain TCP until the engine
takes a ``Security`` (see docs/operations.md); the daemon-to-daemon connection is
mutual TLS already, and unauthorized peers are refused there.
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

import pytest
import trustme

from migrated.demo import CONFIG
from migrated.log import EVENT_MESSAGE_IDS

from .conftest import Cluster
from .sdhost import Host
from .test_systemd import scrape

pytestmark = [pytest.mark.systemd, pytest.mark.netns, pytest.mark.kvm, pytest.mark.uffd]

MIGRATED = "/opt/migrated/bin/migrated"
SOCK = "/run/migrated/vm/web1/control.sock"
MiB = 1 << 20
VM = CONFIG.format(name="web1", memory_mib=128, vcpus=1, guest="memstress", hot_set_mib=4,
                   writes_per_s=2000, fill_percent=100, seed=1, extra="")  # fmt: skip


def vm_status(host: Host) -> dict[str, Any] | None:
    r = host.sh(f"{MIGRATED} status --control {SOCK} --json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def migration_state(host: Host) -> str | None:
    st = vm_status(host)
    return ((st or {}).get("migration") or {}).get("status")


def guest_ready(host: Host) -> bool:
    st = vm_status(host) or {}
    return any((v.get("last_report") or "").startswith(("ready", "verify"))
               for v in (st.get("vm") or {}).get("vcpus", []))  # fmt: skip


def background(host: Host, command: str, out: str) -> None:
    host.sh(f"setsid sh -c {shlex.quote(command)} > {out} 2>&1 < /dev/null &")


def test_migrate_between_two_daemons(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    a.put("/etc/migrated/vms/web1.toml", VM)
    for h in (a, b):
        h.systemctl("start", "migrated.service")

    # Boot: the unit is active once the VM runs (READY), and says so in STATUS.
    a.systemctl("start", "migrated-vm@web1.service")
    assert a.show("migrated-vm@web1.service", "StatusText")["StatusText"].startswith(
        "VM web1 running"
    )
    a.wait_for("the guest to fill its memory", lambda: guest_ready(a), timeout_s=60)

    # 1. A -> B in postcopy, slowed down so that both daemons restart mid-postcopy.
    background(a, f"{MIGRATED} migrate web1 --to {b.ip} --mode postcopy "  # type: ignore[attr-defined]
               "--postcopy-bandwidth 12 --json", "/run/mig1.out")  # fmt: skip
    b.wait_for("postcopy on B", lambda: migration_state(b) == "postcopy-active", timeout_s=30,
               every_s=0.1)  # fmt: skip
    for h in (a, b):
        h.systemctl("restart", "migrated.service")
    assert migration_state(b) == "postcopy-active", "the restart disturbed the migration"
    try:
        b.wait_for("completion on B", lambda: migration_state(b) == "completed" or None,
                   timeout_s=60)  # fmt: skip
    except AssertionError as exc:
        for h, unit in ((a, "migrated-vm@web1"), (b, "migrated-incoming@web1")):
            pid = h.show(f"{unit}.service", "MainPID")["MainPID"]
            h.sh(f"kill -USR2 {pid}", check=False)  # every thread's stack to the journal
        time.sleep(1)
        b_logs = b.sh("journalctl --no-pager -n 150 -u 'migrated-incoming*'", check=False).stdout
        logs = a.sh("journalctl --no-pager -n 150 -u 'migrated*'", check=False).stdout
        logs += f"\n--- host-b: the incoming VM ---\n{b_logs}"
        st = b.sh(f"{MIGRATED} status --control {SOCK} --json", check=False)
        logs += f"\n--- status on B ---\n{st.returncode} {st.stdout} {st.stderr}"
        raise AssertionError(f"{exc}\n--- host-a: journal of migrated* ---\n{logs}") from None
    # The operator's client lost the daemon that was relaying (exit 4), not the VM.
    a.wait_for(
        "the source unit to exit",
        lambda: a.show("migrated-vm@web1.service", "ActiveState")["ActiveState"] == "inactive",
        timeout_s=20,
    )
    assert a.show("migrated-vm@web1.service", "ExecMainStatus")["ExecMainStatus"] == "0"

    # The guest verifies every page on arrival.
    r = b.sh(f"{MIGRATED} verify --control {SOCK}")
    assert "verify ok" in r.stdout
    assert b.show("migrated-incoming@web1.service", "ActiveState")["ActiveState"] == "active"

    # After a postcopy migration B's metrics hold the fault-latency histogram and
    # the vCPU blocktime, from the VM process' own statistics.
    # (The daemon refreshes its view of each VM every second: wait for the one after
    # completion.)
    m = b.wait_for(
        "B's metrics to show web1 running",
        lambda: (lambda m: m if m.get('migrated_vms{state="running"}') == 1 else None)(
            scrape(b, f"http://{b.ip}:9440/metrics")  # type: ignore[attr-defined]
        ),
        timeout_s=10,
    )
    faults = m['migrated_postcopy_fault_latency_seconds_count{vm="web1"}']
    assert faults > 0
    assert m['migrated_postcopy_fault_latency_seconds_bucket{le="+Inf",vm="web1"}'] == faults
    assert 'migrated_postcopy_vcpu_blocktime_seconds{vcpu="0",vm="web1"}' in m

    # A never boots a second copy: the ownership record says where the VM went.
    record = json.loads(a.sh("cat /var/lib/migrated/vms/web1.json").stdout)
    assert record["state"] == "away" and record["peer"].startswith(b.ip)  # type: ignore[attr-defined]
    r = a.sh("systemctl start migrated-vm@web1.service", check=False)
    assert r.returncode != 0
    time.sleep(3)  # longer than RestartSec: no restart loop
    props = a.show("migrated-vm@web1.service", "ActiveState", "NRestarts", "ExecMainStatus")
    assert props == {"ActiveState": "failed", "NRestarts": "0", "ExecMainStatus": "2"}, props
    refusal = [e["MESSAGE"] for e in a.journal("-u", "migrated-vm@web1.service")
               if "refusing to boot" in e.get("MESSAGE", "")]  # fmt: skip
    assert refusal and "migrated to" in refusal[-1]
    listing = json.loads(a.sh(f"{MIGRATED} list --json").stdout)
    web1 = next(v for v in listing["vms"] if v["name"] == "web1")
    assert web1["runstate"] == "not running" and web1["ownership"]["state"] == "away"

    # 2. B -> A (hybrid), watched through the metrics while it runs.
    background(
        b,
        f"{MIGRATED} migrate web1 --to {a.ip} --mode hybrid "  # type: ignore[attr-defined]
        "--precopy-bandwidth 40 --postcopy-bandwidth 40 --json",
        "/run/mig2.out",
    )
    during = b.wait_for(
        "a migration in B's metrics",
        lambda: (lambda m: m if any(k.startswith("migrated_migrations{") for k in m) else None)(
            scrape(b, f"http://{b.ip}:9440/metrics")
        ),
        timeout_s=30,
        every_s=0.2,
    )  # type: ignore[attr-defined]
    left = during.get('migrated_vmi_migration_data_remaining_bytes{vm="web1"}')
    assert left is not None and 0 <= left <= 128 * MiB
    status_text = b.show("migrated.service", "StatusText")["StatusText"]
    assert "1 VM" in status_text
    out = b.wait_for(
        "the second migration",
        lambda: (lambda t: t if '"event": "result"' in t else None)(
            b.sh("cat /run/mig2.out").stdout
        ),
        timeout_s=90,
        every_s=0.5,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "completed", out[-2000:]
    r = a.sh(f"{MIGRATED} verify --control {SOCK}")
    assert "verify ok" in r.stdout
    after = scrape(b, f"http://{b.ip}:9440/metrics")  # type: ignore[attr-defined]
    assert after['migrated_vmi_migration_succeeded_total{role="source",vm="web1"}'] == 1
    assert after['migrated_vmi_migration_succeeded_total{role="destination",vm="web1"}'] == 1
    assert after['migrated_vmi_migration_data_bytes_total{vm="web1"}'] >= 64 * MiB
    assert (
        after['migrated_migration_phase_bytes_total{phase="precopy",role="source",vm="web1"}'] > 0
    )
    # journald: the daemon's operator event, findable by MESSAGE_ID, with the VM.
    done = b.journal(f"MESSAGE_ID={EVENT_MESSAGE_IDS['completed']}")
    assert done and done[-1]["MIGRATED_VM"] == "web1" and done[-1]["MIGRATED_PHASE"] == "completed"
    assert done[-1]["_SYSTEMD_UNIT"] == "migrated.service"
    switch = b.journal(f"MESSAGE_ID={EVENT_MESSAGE_IDS['switchover']}", "MIGRATED_VM=web1")
    assert switch
    # A's incoming VM reclaimed ownership: it may boot here again one day.
    assert json.loads(a.sh("cat /var/lib/migrated/vms/web1.json").stdout)["state"] == "here"


def test_unauthorized_peers_refused(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    for h in (a, b):
        h.systemctl("start", "migrated.service")
    other_ca = trustme.CA()
    cases = {
        "intruder": cluster.tls_files("intruder", a.ip),  # type: ignore[attr-defined]
        "rogue": cluster.tls_files("host-a", a.ip, ca=other_ca),  # type: ignore[attr-defined]
    }
    probe = """\
import asyncio, sys
from migrated.service.tls import TlsSettings, build_security
from migrated.transport import tls_check
from migrated.service.lines import exchange
async def main():
    sec = build_security(TlsSettings(directory=sys.argv[1], allowed_peers=("host-b",)))
    r, w = await tls_check.open_stream(sys.argv[2], 7440, sec)
    async for m in exchange(r, w, "prepare-incoming", name="evil"):
        print(m)
asyncio.run(main())
"""
    plain = """\
import socket, sys
s = socket.create_connection((sys.argv[1], 7440))
s.sendall(b'{"cmd": "prepare-incoming", "name": "evil"}\\n')
print(s.recv(100))
"""
    a.put("/run/probe.py", probe)
    for name, files in cases.items():
        for fname, data in files.items():
            a.put(f"/run/{name}/{fname}", data, 0o600)
        r = a.sh(f"/opt/migrated/bin/python /run/probe.py /run/{name} {b.ip}", check=False)  # type: ignore[attr-defined]
        assert r.returncode != 0 and "result" not in r.stdout, r.stdout
    a.put("/run/plain.py", plain)
    r = a.sh(f"/opt/migrated/bin/python /run/plain.py {b.ip}")  # type: ignore[attr-defined]
    assert r.stdout.strip() == "b''"
    msgs = b.wait_for("three refusals", lambda: (lambda m: m if len(m) >= 3 else None)([
        e["MESSAGE"] for e in b.journal("-u", "migrated.service")
        if "refused connection" in e.get("MESSAGE", "")]), timeout_s=10)  # fmt: skip
    text = "\n".join(msgs)
    assert "intruder" in text and "not authorized" in text
    assert "failed verification" in text
    assert "does not speak TLS" in text
    # Nothing was prepared for the refused peers.
    assert "evil" not in b.sh("ls /run/migrated/incoming 2>/dev/null; true").stdout
