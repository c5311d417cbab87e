"""Where a VM lives, as this host knows it: one small JSON record per VM.

``/var/lib/migrated/vms/NAME.json`` (the state directory survives reboots) holds:

* ``{"state": "outgoing", "to": "HOST:PORT"}`` from the moment an outgoing migration
  starts until we know its outcome.  If the VM process dies meanwhile, nobody here
  can tell whether the destination already runs the guest (the commit point may have
  passed): the VM must not be booted again here automatically.
* ``{"state": "away", "to": ...}``: the migration completed; the VM lives there now.
* ``{"state": "here", "from": ...}``: an incoming migration committed to this host.
* no record: the VM belongs here (or never was here).

``migrated vm NAME`` refuses to boot a VM whose record says ``outgoing`` or ``away``
(exit code 2, which the unit's ``RestartPreventExitStatus=`` stops the restart loop
on).  Writes are atomic (write to a temporary file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrated.errors import ConfigError

__all__ = ["Ownership", "OwnershipRecord"]


@dataclass(frozen=True)
class OwnershipRecord:
    state: str  # "outgoing" | "away" | "here"
    peer: str = ""
    since: float = 0.0

    def blocks_boot(self) -> bool:
        return self.state in ("outgoing", "away")


class Ownership:
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def read(self) -> OwnershipRecord | None:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # An unreadable record is treated as "in doubt", never as "absent".
            return OwnershipRecord("outgoing", f"(unreadable record {self.path}: {exc})")
        return OwnershipRecord(
            str(data.get("state", "outgoing")),
            str(data.get("peer", "")),
            float(data.get("since", 0.0)),
        )

    def write(self, state: str, peer: str = "") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = {"state": state, "peer": peer, "since": time.time()}
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dirfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def check_boot(self, name: str) -> None:
        """Raise ConfigError (exit 2) when booting ``name`` here could run a second copy."""
        rec = self.read()
        if rec is None or not rec.blocks_boot():
            return
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.since)) if rec.since else "?"
        if rec.state == "away":
            msg = f"VM {name} migrated to {rec.peer} at {when}; it runs there, not here"
            hint = f"migrate it back, or, if it is gone there for good, remove {self.path}"
        else:
            msg = (
                f"VM {name} was migrating to {rec.peer} (since {when}) when its process "
                "ended: the destination may run it now"
            )
            hint = (
                f"check on {rec.peer} with `migrated list`; only if the VM does not run "
                f"there, remove {self.path} and start it again"
            )
        raise ConfigError(f"refusing to boot: {msg}", hint=hint)
