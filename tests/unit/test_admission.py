"""Memory admission (migrated.vmm.admission): fake /proc and cgroup trees for every
layout (v1, v2, hybrid, a container's sub-mount, hugetlb, strict overcommit), then the
real thing: a memory cgroup of our own with a limit, a process placed in it, the check
and the reservation run inside, and the OOM fact the design rests on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from migrated.errors import InsufficientMemory
from migrated.kernel import Backing
from migrated.vmm.admission import OomShield, Reservation, admit, assess, reserve
from migrated.vmm.hostmem import HostMemory

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
UNLIMITED_V1 = 9223372036854771712


class Tree:
    """A fake root: /proc/{meminfo,self/cgroup,self/mountinfo} and cgroup files."""

    def __init__(self, root: Path, *, mem_available_mib: int = 8192) -> None:
        self.root = root
        self.mounts: list[str] = []
        self.cgroup_lines: list[str] = []
        self.meminfo(mem_available_mib)
        self._write("proc/sys/vm/overcommit_memory", "0\n")

    def _write(self, rel: str, text: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    def meminfo(self, available_mib: int, **extra: int) -> None:
        lines = {
            "MemTotal": f"{16384 * 1024} kB",
            "MemFree": f"{available_mib * 1024} kB",
            "MemAvailable": f"{available_mib * 1024} kB",
            "HugePages_Total": "0",
            "HugePages_Free": "0",
            "HugePages_Rsvd": "0",
            "Hugepagesize": "2048 kB",
        }
        for k, v in extra.items():
            lines[k] = f"{v} kB" if not k.startswith("HugePages") else str(v)
        self._write("proc/meminfo", "".join(f"{k}:  {v}\n" for k, v in lines.items()))

    def mount(self, point: str, fstype: str, opts: str, root: str = "/") -> None:
        n = len(self.mounts) + 30
        self.mounts.append(f"{n} 1 0:{n} {root} {point} rw,relatime shared:{n} - {fstype} "
                           f"{fstype} {opts}")  # fmt: skip
        (self.root / point.lstrip("/").replace("\\040", " ")).mkdir(parents=True, exist_ok=True)

    def member(self, line: str) -> None:
        self.cgroup_lines.append(line)

    def files(self, d: str, **values: str | int) -> None:
        """``memory_max=...`` writes memory.max; ``hugetlb_2MB_max`` hugetlb.2MB.max."""
        for key, value in values.items():
            name = key.replace("_", ".", 1)
            if name.startswith("hugetlb.2MB_"):
                name = "hugetlb.2MB." + name.removeprefix("hugetlb.2MB_")
            self._write(f"{d.lstrip('/')}/{name}", f"{value}\n")

    def stat(self, d: str, **values: int) -> None:
        self._write(
            f"{d.lstrip('/')}/memory.stat", "".join(f"{k} {v}\n" for k, v in values.items())
        )

    def host(self) -> HostMemory:
        self._write("proc/self/mountinfo", "\n".join(self.mounts) + "\n")
        self._write("proc/self/cgroup", "\n".join(self.cgroup_lines) + "\n")
        return HostMemory(self.root)


def v1_tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path)
    t.mount("/sys/fs/cgroup/memory", "cgroup", "rw,memory")
    t.mount("/sys/fs/cgroup/cpu", "cgroup", "rw,cpu")
    t.member("4:memory:/a/b")
    t.member("1:cpu:/")
    base = "sys/fs/cgroup/memory"
    t.files(base, memory_limit_in_bytes=UNLIMITED_V1, memory_usage_in_bytes=5000 * MiB)
    t.files(f"{base}/a", memory_limit_in_bytes=1024 * MiB, memory_usage_in_bytes=900 * MiB)
    t.files(f"{base}/a/b", memory_limit_in_bytes=300 * MiB, memory_usage_in_bytes=100 * MiB)
    return t


def test_memavailable_alone(tmp_path: Path) -> None:
    t = Tree(tmp_path, mem_available_mib=1000)
    host = t.host()
    a = admit(512 * MiB, host=host)
    assert [b.limit for b in a.budgets] == ["MemAvailable"]
    assert a.budgets[0].needed_bytes == 512 * MiB + 64 * MiB
    with pytest.raises(InsufficientMemory) as ei:
        admit(1000 * MiB, host=host, what="VM db1")
    msg = str(ei.value)
    assert "VM db1" in msg and "1064.0 MiB" in msg and "1000.0 MiB" in msg, msg
    assert "MemAvailable" in msg
    assert ei.value.hint


def test_v1_walks_up_to_the_tightest_ancestor(tmp_path: Path) -> None:
    t = v1_tree(tmp_path)
    t.stat("sys/fs/cgroup/memory/a", total_inactive_file=20 * MiB)
    host = t.host()
    dirs = [d for _, d in host.cgroup_dirs("memory")]
    base = tmp_path / "sys/fs/cgroup/memory"
    assert dirs == [base / "a/b", base / "a", base]
    a = assess(50 * MiB, headroom_bytes=0, host=host)
    # /a/b leaves 200 MiB, /a only 124 + 20 reclaimable; the root is unlimited.
    assert a.binding is not None and a.binding.limit.endswith("/sys/fs/cgroup/memory/a")
    assert a.binding.available_bytes == 144 * MiB
    assert {b.limit.split()[0] for b in a.budgets} == {"MemAvailable", "memory.limit_in_bytes"}
    with pytest.raises(InsufficientMemory) as ei:
        admit(100 * MiB, host=host)
    msg = str(ei.value)
    assert "memory.limit_in_bytes of memory cgroup v1 /sys/fs/cgroup/memory/a " in msg, msg
    assert "164.0 MiB" in msg and "144.0 MiB" in msg, msg
    assert str(base / "a" / "memory.limit_in_bytes") in ei.value.hint


def test_v2_max_high_and_reclaimable(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    t.mount("/sys/fs/cgroup", "cgroup2", "rw,nsdelegate")
    t.member("0::/svc/recv")
    t.files("sys/fs/cgroup/svc", memory_max="max", memory_high="max", memory_current=10 * MiB)
    t.files("sys/fs/cgroup/svc/recv", memory_max=512 * MiB, memory_high=400 * MiB,
            memory_current=100 * MiB)  # fmt: skip
    t.stat("sys/fs/cgroup/svc/recv", inactive_file=30 * MiB, anon=70 * MiB)
    host = t.host()
    a = assess(0, headroom_bytes=0, host=host)
    b = a.binding
    assert b is not None and b.limit.startswith(
        "memory.high of memory cgroup v2 /sys/fs/cgroup/svc/recv"
    )
    assert b.available_bytes == 330 * MiB
    admit(266 * MiB, host=host)
    with pytest.raises(InsufficientMemory, match=r"memory\.high"):
        admit(267 * MiB, host=host)


def test_v2_container_submount_and_no_controller_levels(tmp_path: Path) -> None:
    """A container sees its cgroup mounted at /sys/fs/cgroup with root /docker/abc;
    levels without memory.max (controller not enabled) are skipped."""
    t = Tree(tmp_path)
    t.mount("/sys/fs/cgroup", "cgroup2", "rw", root="/docker/abc")
    t.member("0::/docker/abc/app")
    t.files("sys/fs/cgroup", memory_max=256 * MiB, memory_current=50 * MiB)
    (tmp_path / "sys/fs/cgroup/app").mkdir()
    host = t.host()
    assert [d for _, d in host.cgroup_dirs("memory")] == [tmp_path / "sys/fs/cgroup"]
    with pytest.raises(InsufficientMemory) as ei:
        admit(200 * MiB, host=host)
    assert "206.0 MiB" in str(ei.value) and "264.0 MiB" in str(ei.value)


def test_hybrid_v1_memory_with_v2_unified(tmp_path: Path) -> None:
    """This machine's layout: memory on v1, a cgroup2 mount without the memory
    controller; and mount points with a space (escaped in mountinfo)."""
    t = Tree(tmp_path)
    t.mount("/sys/fs/cgroup/mem\\040ory", "cgroup", "rw,memory")
    t.mount("/sys/fs/cgroup/unified", "cgroup2", "rw")
    t.member("4:memory:/x")
    t.member("0::/")
    t.files("sys/fs/cgroup/mem ory/x", memory_limit_in_bytes=128 * MiB, memory_usage_in_bytes=0)
    host = t.host()
    assert host.cgroup_dirs("memory")[0] == (1, tmp_path / "sys/fs/cgroup/mem ory/x")
    with pytest.raises(InsufficientMemory, match="v1 /sys/fs/cgroup/mem ory/x"):
        admit(65 * MiB, host=host)
    admit(64 * MiB, host=host)


def test_hidden_cgroup_is_reported_unchecked(tmp_path: Path) -> None:
    """A v1 memory cgroup listed in /proc/self/cgroup whose mount this process cannot
    see (``ip netns exec`` hides /sys/fs/cgroup): admitted on MemAvailable, with the
    cgroup named as not checked."""
    t = Tree(tmp_path)
    t.mount("/sys", "sysfs", "rw")
    t.member("4:memory:/a/b")
    t.member("0::/")
    a = admit(64 * MiB, host=t.host())
    assert [b.limit for b in a.budgets] == ["MemAvailable"]
    assert a.unchecked == ("memory cgroup v1 /a/b",)
    assert "not checked" in a.describe()
    t2 = v1_tree(tmp_path / "visible")
    assert assess(MiB, host=t2.host()).unchecked == ()


def test_unlimited_cgroup_adds_no_budget(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    t.mount("/sys/fs/cgroup/memory", "cgroup", "rw,memory")
    t.member("4:memory:/")
    t.files("sys/fs/cgroup/memory", memory_limit_in_bytes=UNLIMITED_V1, memory_usage_in_bytes=1)
    assert [b.limit for b in assess(MiB, host=t.host()).budgets] == ["MemAvailable"]


def test_hugetlb_needs_free_unreserved_huge_pages(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    t._write("sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "300\n")
    t._write("sys/kernel/mm/hugepages/hugepages-2048kB/resv_hugepages", "100\n")
    t.mount("/sys/fs/cgroup", "cgroup2", "rw")
    t.member("0::/h")
    t.files("sys/fs/cgroup/h", hugetlb_2MB_max=300 * MiB, hugetlb_2MB_current=0)
    host = t.host()
    a = assess(399 * MiB, Backing.HUGETLB, host=host)
    huge = [b for b in a.budgets if "huge" in b.limit]
    assert {b.available_bytes for b in huge} == {400 * MiB, 300 * MiB}
    assert all(b.needed_bytes == 400 * MiB for b in huge)  # rounded up to 2 MiB pages
    mem = [b for b in a.budgets if b.limit == "MemAvailable"]
    assert mem[0].needed_bytes == 64 * MiB  # hugetlb is not normal memory: only headroom
    with pytest.raises(InsufficientMemory, match=r"hugetlb\.2MB\.max") as ei:
        admit(399 * MiB, "hugetlb", host=host)
    assert "hugetlb" in str(ei.value)
    admit(300 * MiB, "hugetlb", host=host)


def test_hugetlb_from_meminfo_without_sysfs(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    t.meminfo(8192, HugePages_Free=10, HugePages_Rsvd=4)
    with pytest.raises(InsufficientMemory) as ei:
        admit(14 * MiB, Backing.HUGETLB, host=t.host())
    assert "12.0 MiB" in str(ei.value) and "vm.nr_hugepages" in ei.value.hint


def test_strict_overcommit_counts_commit_limit(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    t.meminfo(8192, CommitLimit=4096 * 1024, Committed_AS=3900 * 1024)
    t._write("proc/sys/vm/overcommit_memory", "2\n")
    with pytest.raises(InsufficientMemory, match="CommitLimit"):
        admit(200 * MiB, host=t.host())


def test_memfd_counts_like_anonymous(tmp_path: Path) -> None:
    t = v1_tree(tmp_path)
    a, m = assess(64 * MiB, "anonymous", host=t.host()), assess(64 * MiB, "memfd", host=t.host())
    assert [(b.limit, b.needed_bytes) for b in a.budgets] == [
        (b.limit, b.needed_bytes) for b in m.budgets
    ]


def test_this_host(tmp_path: Path) -> None:
    """The real /proc: MemAvailable is read, and a guest twice the size of the host's
    RAM is refused naming MemAvailable."""
    info = HostMemory().meminfo()
    a = assess(MiB)
    assert any(b.limit == "MemAvailable" for b in a.budgets) and a.ok
    with pytest.raises(InsufficientMemory, match="MemAvailable"):
        admit(2 * info["MemTotal"])


# -- the reservation ------------------------------------------------------------------------


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_reservation_is_populated_and_released_in_chunks() -> None:
    before = _rss_kib()
    with Reservation(64 * MiB, chunk_bytes=8 * MiB) as r:
        assert r.held_bytes == 64 * MiB
        assert _rss_kib() - before >= 60 * 1024  # really faulted in, not just mapped
        assert r.release(5 * MiB) == 0  # below one chunk: carried over
        assert r.release(5 * MiB) == 8 * MiB
        assert r.held_bytes == 56 * MiB
        assert _rss_kib() - before < 60 * 1024
        assert r.release(100 * MiB) == 56 * MiB and r.held_bytes == 0
        assert r.release(MiB) == 0
    r.close()  # idempotent


def test_reserve_for_hugetlb_holds_nothing_here(tmp_path: Path) -> None:
    t = Tree(tmp_path)
    t.meminfo(8192, HugePages_Free=64, HugePages_Rsvd=0)
    with reserve(64 * MiB, Backing.HUGETLB, host=t.host()) as r:
        assert r.held_bytes == 0


# -- for real: a memory cgroup with a limit ------------------------------------------------

_INSIDE = textwrap.dedent(
    """
    import json, sys
    from migrated.errors import InsufficientMemory
    from migrated.vmm.admission import admit, reserve
    from migrated.vmm.hostmem import HostMemory
    MiB = 1 << 20
    out = {"levels": [str(d) for _, d in HostMemory().cgroup_dirs("memory")]}
    try:
        admit(int(sys.argv[1]) * MiB, what="VM big")
        out["big"] = "admitted"
    except InsufficientMemory as exc:
        out["big"] = str(exc)
        out["hint"] = exc.hint
    cg = out["levels"][0]
    def used():
        for name in ("memory.usage_in_bytes", "memory.current"):
            try:
                return int(open(cg + "/" + name).read())
            except FileNotFoundError:
                pass
    u0 = used()
    r = reserve(int(sys.argv[2]) * MiB, headroom_bytes=16 * MiB)
    out["reserved_delta_mib"] = (used() - u0) / MiB
    r.release(r.held_bytes // 2)
    out["released_delta_mib"] = (used() - u0) / MiB
    r.close()
    print(json.dumps(out))
    """
)


@pytest.fixture
def cgroup_200m():  # type: ignore[no-untyped-def]
    from tests.integration.faults import CgroupUnavailable, MemoryCgroup

    try:
        cg = MemoryCgroup(200 * MiB)
    except CgroupUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield cg
    finally:
        cg.remove()


def _inside(cg, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [*cg.wrap(), sys.executable, "-c", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_real_cgroup_refuses_and_reserves(cgroup_200m) -> None:  # type: ignore[no-untyped-def]
    """A process in a 200 MiB memory cgroup: a 256 MiB guest is refused naming the
    cgroup, its limit and the sizes; 64 MiB is admitted, reserved (the cgroup's usage
    grows by 64 MiB at once) and given back."""
    import json

    r = _inside(cgroup_200m, _INSIDE, "256", "64")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["levels"][0] == str(cgroup_200m.path)
    msg = out["big"]
    assert "VM big" in msg and "320.0 MiB" in msg, msg
    assert f"cgroup v{cgroup_200m.version} " in msg and cgroup_200m.name in msg, msg
    assert ("memory.max" if cgroup_200m.version == 2 else "memory.limit_in_bytes") in msg
    assert cgroup_200m.name in out["hint"]
    assert 63 <= out["reserved_delta_mib"] <= 70, out
    assert 31 <= out["released_delta_mib"] <= 38, out
    assert cgroup_200m.oom_kills() == 0


def test_real_cgroup_populating_past_the_limit_is_an_oom_kill(cgroup_200m) -> None:  # type: ignore[no-untyped-def]
    """The fact the design rests on: taking memory past a cgroup's limit does not
    fail politely, the OOM killer ends the process.  So admission must come first,
    and a reservation that loses a race dies at Setup, not in postcopy."""
    code = "from migrated.vmm.admission import Reservation; Reservation(300 << 20); print('held')"
    r = _inside(cgroup_200m, code)
    assert r.returncode == -9, (r.returncode, r.stdout, r.stderr)
    assert "held" not in r.stdout
    assert cgroup_200m.oom_kills() >= 1


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from migrated.vmm.admission import OomShield, Reservation
    shield = OomShield() if sys.argv[1] == "shield" else None
    r = Reservation(130 << 20)
    print("held", shield.active if shield else None, flush=True)
    time.sleep(30)
    """
)
_HOG = "from migrated.vmm.admission import Reservation; Reservation(100 << 20); print('hog')"


@pytest.mark.parametrize("shielded", [True, False])
def test_real_cgroup_shielded_reservation_survives_a_hog(cgroup_200m, shielded: bool) -> None:  # type: ignore[no-untyped-def]
    """A receiver holding 130 MiB and a 100 MiB newcomer do not both fit in 200 MiB.
    Unshielded, the OOM killer picks the largest, the receiver; shielded, the
    newcomer dies and the reservation is intact."""
    holder = subprocess.Popen(
        [*cgroup_200m.wrap(), sys.executable, "-c", _HOLDER, "shield" if shielded else "bare"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline().strip()
        if line == "held False":
            pytest.skip("lowering oom_score_adj needs CAP_SYS_RESOURCE, which this host lacks")
        assert line == f"held {True if shielded else None}", line
        hog = _inside(cgroup_200m, _HOG)
        time.sleep(0.2)
        if shielded:
            assert hog.returncode == -9, (hog.returncode, hog.stdout, hog.stderr)
            assert holder.poll() is None, "the shielded receiver was OOM-killed"
        else:
            assert holder.wait(10) == -9, "the receiver was not the OOM victim"
            assert hog.returncode == 0, (hog.returncode, hog.stderr)
        assert cgroup_200m.oom_kills() == 1
    finally:
        holder.kill()
        holder.wait(10)


def test_oom_shield_restores(tmp_path: Path) -> None:
    f = tmp_path / "oom_score_adj"
    f.write_text("200\n")
    with OomShield(path=str(f)) as s:
        assert s.active and f.read_text() == "-1000"
    assert f.read_text() == "200"
