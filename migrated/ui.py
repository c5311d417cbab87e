"""What the command line shows a person: events as short lines, progress on a tty.

Shared by ``migrated`` (cli) and ``migrated demo``; the JSON form (``--json``) is one
object per line on stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["Printer"]


class Printer:
    """Events to stdout as JSON lines (--json) or to stderr as short human lines."""

    def __init__(self, as_json: bool, *, progress: bool = True) -> None:
        self.as_json = as_json
        self.tty = sys.stderr.isatty()
        self.progress = progress
        self._line_open = False

    def __call__(self, event: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(event), flush=True)
            return
        kind = event.get("event")
        if kind == "progress":
            if self.progress and self.tty:
                sys.stderr.write("\r\033[K" + _progress_text(event))
                sys.stderr.flush()
                self._line_open = True
            return
        if self._line_open:
            sys.stderr.write("\n")
            self._line_open = False
        if kind == "result":
            return  # printed by the command
        text = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "stats"))
        print(f"migrated: {kind}: {text}", file=sys.stderr, flush=True)


def _progress_text(e: dict[str, Any]) -> str:
    total = e.get("total_pages") or 1
    if "pages_remaining" in e:
        done = total - e["pages_remaining"]
        extra = f"requests {e.get('requests_served', 0)}"
    else:
        done = e.get("pages_installed", 0)
        extra = f"faults {e.get('faults', 0)}"
    pct = min(99.9, 100.0 * done / total)  # 100 % only once the destination confirms
    rate = e.get("rate_bytes_per_s")
    rate_text = f"{rate / 1e9:.2f} GB/s  " if rate else ""
    return (
        f"[{e.get('status')}] {pct:5.1f}%  {e.get('transferred_bytes', 0) / 2**20:.0f} MiB  "
        f"{rate_text}{extra}  {e.get('elapsed_s', 0):.1f}s"
    )
