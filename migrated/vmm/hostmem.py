"""What this host and this process's cgroups let a process still allocate.

Reads ``/proc/meminfo``, ``/proc/sys/vm/overcommit_memory``, ``/proc/PID/cgroup``,
``/proc/PID/mountinfo`` and the memory and hugetlb controllers' files of cgroup v1
and v2, and turns each limit that applies into a :class:`MemoryBudget`.  Every path
is taken relative to an injectable root, so tests can run it against a fake tree.
See :mod:`migrated.vmm.admission` for the facts behind each budget.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HUGE_PAGE_BYTES", "HostMemory", "MemoryBudget", "MiB", "mib_text"]

MiB = 1 << 20
HUGE_PAGE_BYTES = 2 * MiB
#: cgroup v1 writes "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 here).
_UNLIMITED = 1 << 62


def mib_text(nbytes: int) -> str:
    return f"{nbytes / MiB:.1f} MiB"


@dataclass(frozen=True)
class MemoryBudget:
    """One limit on the memory this process may still take.

    ``limit`` names it (``MemAvailable``, ``memory.max of cgroup /a/b``, ...),
    ``detail`` says how ``available_bytes`` was computed, ``hint`` how to raise it.
    """

    limit: str
    needed_bytes: int
    available_bytes: int
    detail: str
    hint: str

    @property
    def ok(self) -> bool:
        return self.available_bytes >= self.needed_bytes


# -- reading the host ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup path mounted there (field 4 of mountinfo)
    point: Path
    fstype: str
    super_options: frozenset[str]


class HostMemory:
    """Reads /proc and the cgroup file systems of one process.

    ``root`` prefixes every absolute path (``/proc/...``, mount points), so tests
    can point it at a fake tree.  ``pid`` selects whose cgroups are read.
    """

    def __init__(self, root: str | os.PathLike[str] = "/", pid: int | str = "self") -> None:
        self.root = Path(root)
        self.pid = str(pid)

    def _path(self, absolute: str | Path) -> Path:
        return self.root / str(absolute).lstrip("/")

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo in bytes (``kB`` values scaled; counts such as
        ``HugePages_Free`` as they are)."""
        out: dict[str, int] = {}
        for line in self._path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if not parts or not parts[0].isdigit():
                continue
            value = int(parts[0])
            out[key.strip()] = value * 1024 if parts[1:2] == ["kB"] else value
        return out

    def overcommit_mode(self) -> int:
        try:
            return int(self._path("/proc/sys/vm/overcommit_memory").read_text().strip())
        except (FileNotFoundError, ValueError):
            return 0

    def _mounts(self) -> list[_Mount]:
        mounts = []
        for line in self._path(f"/proc/{self.pid}/mountinfo").read_text().splitlines():
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 3:
                continue
            point = _unescape(fields[4])
            mounts.append(
                _Mount(
                    _unescape(fields[3]),
                    self._path(point),
                    rfields[0],
                    frozenset(rfields[2].split(",")),
                )
            )
        return mounts

    def _memberships(self) -> list[tuple[frozenset[str], str]]:
        """(controllers, cgroup path) per line of /proc/PID/cgroup; v2 has no
        controllers."""
        out = []
        for line in self._path(f"/proc/{self.pid}/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3:
                out.append((frozenset(c for c in parts[1].split(",") if c), parts[2]))
        return out

    def cgroup_dirs(self, controller: str) -> list[tuple[int, Path]]:
        """The directories of this process's cgroup for ``controller`` ("memory" or
        "hugetlb") and of each ancestor up to the mount point, innermost first,
        as (cgroup version, directory).  Empty when the controller is not mounted."""
        mounts = self._mounts()
        found: list[tuple[int, Path]] = []
        for controllers, cg_path in self._memberships():
            if controllers:
                if controller not in controllers:
                    continue
                candidates = [
                    (1, m) for m in mounts if m.fstype == "cgroup" and controller in m.super_options
                ]
            else:
                candidates = [(2, m) for m in mounts if m.fstype == "cgroup2"]
            for version, m in candidates:
                leaf = _inside(m, cg_path)
                if leaf is None:
                    continue
                levels = _levels(m.point, leaf)
                if version == 2:
                    # The controller is enabled for a cgroup when its files exist.
                    marker = "memory.max" if controller == "memory" else "hugetlb.2MB.max"
                    levels = [d for d in levels if (d / marker).exists()]
                    if not levels:
                        continue
                found.extend((version, d) for d in levels)
                break
        return found

    def hidden_cgroups(self, controller: str = "memory") -> list[str]:
        """Cgroups this process belongs to for ``controller`` whose files it cannot see
        (no mount shows them): their limits cannot be checked.  ``ip netns exec``
        does this: it remounts /sys, hiding /sys/fs/cgroup.  Returns descriptions
        such as ``"memory cgroup v1 /a/b"``."""
        if self.cgroup_dirs(controller):
            return []
        mounts = self._mounts()
        hidden = []
        v1 = [p for cs, p in self._memberships() if controller in cs]
        for path in v1:
            hidden.append(f"{controller} cgroup v1 {path}")
        has_v2_mount = any(m.fstype == "cgroup2" for m in mounts)
        if not v1 and not has_v2_mount:
            hidden += [f"{controller} cgroup v2 {p}" for cs, p in self._memberships() if not cs]
        return hidden

    # -- budgets ------------------------------------------------------------------------

    def memory_budgets(self, needed_bytes: int) -> list[MemoryBudget]:
        """Budgets for ``needed_bytes`` of 4 KiB (anonymous or shmem) memory."""
        info = self.meminfo()
        budgets = []
        if "MemAvailable" in info:
            budgets.append(
                MemoryBudget(
                    "MemAvailable",
                    needed_bytes,
                    info["MemAvailable"],
                    f"/proc/meminfo: MemAvailable {mib_text(info['MemAvailable'])} of MemTotal "
                    f"{mib_text(info.get('MemTotal', 0))}",
                    "free memory on this host or choose a destination with more memory",
                )
            )
        if self.overcommit_mode() == 2 and "CommitLimit" in info:
            left = info["CommitLimit"] - info.get("Committed_AS", 0)
            budgets.append(
                MemoryBudget(
                    "CommitLimit (vm.overcommit_memory=2)",
                    needed_bytes,
                    max(0, left),
                    f"CommitLimit {mib_text(info['CommitLimit'])} - Committed_AS "
                    f"{mib_text(info.get('Committed_AS', 0))}",
                    "raise vm.overcommit_ratio / vm.overcommit_kbytes, or free memory",
                )
            )
        for version, d in self.cgroup_dirs("memory"):
            b = _memcg_budget(version, d, needed_bytes, self.root)
            if b is not None:
                budgets.append(b)
        return budgets

    def hugetlb_budgets(self, needed_bytes: int) -> list[MemoryBudget]:
        """Budgets for ``needed_bytes`` of 2 MiB hugetlb pages."""
        d = self._path("/sys/kernel/mm/hugepages/hugepages-2048kB")
        if d.is_dir():
            free = int((d / "free_hugepages").read_text())
            resv = int((d / "resv_hugepages").read_text())
        else:
            info = self.meminfo()
            if info.get("Hugepagesize") != HUGE_PAGE_BYTES:
                free = resv = 0
            else:
                free, resv = info.get("HugePages_Free", 0), info.get("HugePages_Rsvd", 0)
        budgets = [
            MemoryBudget(
                "free 2 MiB huge pages",
                needed_bytes,
                max(0, free - resv) * HUGE_PAGE_BYTES,
                f"{free} free, {resv} of them reserved",
                f"add huge pages: sysctl vm.nr_hugepages (needs {needed_bytes // HUGE_PAGE_BYTES}"
                " free ones)",
            )
        ]
        for version, cg in self.cgroup_dirs("hugetlb"):
            names = (
                ("hugetlb.2MB.max", "hugetlb.2MB.current")
                if version == 2
                else ("hugetlb.2MB.limit_in_bytes", "hugetlb.2MB.usage_in_bytes")
            )
            limit = _read_limit(cg / names[0])
            if limit is None:
                continue
            usage = _read_int(cg / names[1])
            budgets.append(
                MemoryBudget(
                    f"{names[0]} of cgroup {_cg_name(cg, self.root)}",
                    needed_bytes,
                    max(0, limit - usage),
                    f"limit {mib_text(limit)} - usage {mib_text(usage)}",
                    f"raise {cg / names[0]}",
                )
            )
        return budgets


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")).replace(
        "\\134", "\\"
    )


def _inside(m: _Mount, cg_path: str) -> Path | None:
    """The directory of cgroup ``cg_path`` under mount ``m``, or None when the mount
    does not show it."""
    rel = cg_path
    # Under a cgroup namespace the paths are relative to its root already; otherwise a
    # mount of a sub-hierarchy (a container's) shows the part below its root.
    prefix = m.root.rstrip("/")
    if prefix and (cg_path == prefix or cg_path.startswith(prefix + "/")):
        rel = cg_path[len(prefix) :]
    d = m.point / rel.lstrip("/")
    return d if d.is_dir() else None


def _levels(top: Path, leaf: Path) -> list[Path]:
    levels = [leaf]
    d = leaf
    while d != top and top in d.parents:
        d = d.parent
        levels.append(d)
    return levels


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return 0


def _read_limit(path: Path) -> int | None:
    """A limit file's value; None when absent or unlimited ("max" or PAGE_COUNTER_MAX)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if text == "max":
        return None
    value = int(text)
    return None if value >= _UNLIMITED else value


def _read_stat(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    return out


def _cg_name(d: Path, root: Path) -> str:
    return "/" + str(d.relative_to(root)) if d.is_relative_to(root) else str(d)


def _memcg_budget(version: int, d: Path, needed: int, root: Path) -> MemoryBudget | None:
    stat = _read_stat(d / "memory.stat")
    if version == 2:
        limits = [(n, _read_limit(d / n)) for n in ("memory.max", "memory.high")]
        usage_file = "memory.current"
        reclaimable = stat.get("inactive_file", 0)
    else:
        limits = [("memory.limit_in_bytes", _read_limit(d / "memory.limit_in_bytes"))]
        usage_file = "memory.usage_in_bytes"
        reclaimable = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    set_limits = [(n, v) for n, v in limits if v is not None]
    if not set_limits:
        return None
    name, limit = min(set_limits, key=lambda nv: nv[1])
    usage = _read_int(d / usage_file)
    available = max(0, limit - usage + min(reclaimable, usage))
    return MemoryBudget(
        f"{name} of memory cgroup v{version} {_cg_name(d, root)}",
        needed,
        available,
        f"{name} {mib_text(limit)} - {usage_file.split('.')[-1]} {mib_text(usage)} + reclaimable "
        f"page cache {mib_text(min(reclaimable, usage))}",
        f"raise the cgroup's limit ({d / name}), move the receiver to a larger cgroup, or "
        "choose a destination with more memory",
    )
