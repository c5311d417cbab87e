"""VM configuration: TOML -> frozen records.

Every key is checked; an unknown key or a bad value is a :class:`ConfigError` whose
message starts with the key path (``guest.hot_set_mib: expected a positive integer,
got -3``).  Relative ``guest.image`` paths are resolved against the file's directory.
See configs/memstress.toml for the documented keys.
"""

from __future__ import annotations

import tomllib
import uuid as uuid_mod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrated.errors import ConfigError

from .boot import MAX_RAM_BYTES, MAX_VCPUS, PARAMS_MAX

__all__ = ["BUILTIN_DEFAULTS", "GuestConfig", "VmConfig", "load_config"]

U64_MAX = (1 << 64) - 1
MiB = 1 << 20
PAGE_SIZE = 4096

#: Defaults of the built-in guests' parameters.  ``idle`` writes a few pages slowly and
#: sleeps in between, so a transfer can be measured without dirtying.
BUILTIN_DEFAULTS: dict[str, dict[str, int]] = {
    "memstress": {
        "hot_set_pages": 16 * MiB // PAGE_SIZE,
        "writes_per_s": 0,
        "verify_every_writes": 0,
        "fill_percent": 100,
        "seed": 1,
    },
    "idle": {
        "hot_set_pages": 4,
        "writes_per_s": 10,
        "verify_every_writes": 0,
        "fill_percent": 100,
        "seed": 1,
    },
}


@dataclass(frozen=True)
class GuestConfig:
    """Either a built-in guest (``builtin`` plus its parameters) or an ``image`` file.

    ``hot_set_pages`` is the VM-wide hot set; each vCPU gets an equal share.
    ``params`` are the raw boot parameters of an ``image`` guest.
    """

    builtin: str | None = "memstress"
    image: str | None = None
    entry_offset: int = 0
    hot_set_pages: int = BUILTIN_DEFAULTS["memstress"]["hot_set_pages"]
    writes_per_s: int = 0
    verify_every_writes: int = 0
    fill_percent: int = 100
    seed: int = 1
    params: tuple[int, ...] = ()

    def boot_params(self, vcpus: int) -> tuple[int, ...]:
        """The u64 values the VMM writes to the boot-parameter page."""
        if self.builtin is None:
            return self.params
        per_vcpu = max(1, -(-self.hot_set_pages // vcpus))
        return (per_vcpu, self.writes_per_s, self.verify_every_writes, self.fill_percent, self.seed)


@dataclass(frozen=True)
class VmConfig:
    name: str
    uuid: str = field(default_factory=lambda: str(uuid_mod.uuid4()))
    memory_mib: int = 256
    vcpus: int = 1
    guest: GuestConfig = GuestConfig()
    console: str = "none"  # "stdout", "none", or a file path (appended to)
    cpl: int = 3

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MiB

    @classmethod
    def from_toml(cls, text: str, *, base_dir: Path | None = None) -> VmConfig:
        """Parse TOML text.  Raises ConfigError (TOML syntax errors included)."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}") from exc
        return cls.from_dict(data, base_dir=base_dir)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: Path | None = None) -> VmConfig:
        """Build from a dict shaped like the TOML file.  Raises ConfigError."""
        r = _Reader(data, "")
        name = r.string("name", required=True)
        assert name is not None
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(
                f"name: expected 1-64 characters of letters, digits, '-', '_', '.', got {name!r}"
            )
        raw_uuid = r.string("uuid")
        if raw_uuid is None:
            vm_uuid = str(uuid_mod.uuid4())
        else:
            try:
                vm_uuid = str(uuid_mod.UUID(raw_uuid))
            except ValueError:
                raise ConfigError(f"uuid: expected a UUID, got {raw_uuid!r}") from None
        memory_mib = r.integer("memory_mib", default=256, minimum=2)
        if memory_mib % 2 or memory_mib * MiB > MAX_RAM_BYTES:
            raise ConfigError(
                f"memory_mib: expected an even number of MiB up to "
                f"{MAX_RAM_BYTES // MiB} (RAM is mapped with 2 MiB pages), got {memory_mib}"
            )
        vcpus = r.integer("vcpus", default=1, minimum=1)
        if vcpus > MAX_VCPUS:
            raise ConfigError(f"vcpus: expected 1..{MAX_VCPUS}, got {vcpus}")
        console = r.string("console", default="none")
        assert console is not None
        if console not in ("stdout", "none"):
            if not console:
                raise ConfigError("console: expected 'stdout', 'none' or a file path, got ''")
            path = Path(console)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            console = str(path)
        cpl = r.integer("cpl", default=3, minimum=0)
        if cpl not in (0, 3):
            raise ConfigError(f"cpl: expected 3 (or 0 on hosts with VT-x/SVM), got {cpl}")
        guest = _guest(r.table("guest"), base_dir)
        r.finish()
        return cls(
            name=name,
            uuid=vm_uuid,
            memory_mib=memory_mib,
            vcpus=vcpus,
            guest=guest,
            console=console,
            cpl=cpl,
        )

    def to_dict(self) -> dict[str, Any]:
        """A dict :meth:`from_dict` accepts (and msgpack can carry)."""
        g = self.guest
        guest: dict[str, Any]
        if g.builtin is not None:
            guest = {
                "builtin": g.builtin,
                "hot_set_pages": g.hot_set_pages,
                "writes_per_s": g.writes_per_s,
                "verify_every_writes": g.verify_every_writes,
                "fill_percent": g.fill_percent,
                "seed": g.seed,
            }
        else:
            guest = {"image": g.image, "entry_offset": g.entry_offset, "params": list(g.params)}
        return {
            "name": self.name,
            "uuid": self.uuid,
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "console": self.console,
            "cpl": self.cpl,
            "guest": guest,
        }


def load_config(path: str | Path) -> VmConfig:
    """Read and validate a TOML config file.  Raises ConfigError (also when unreadable)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text") from exc
    return VmConfig.from_toml(text, base_dir=path.parent)


def _guest(r: _Reader, base_dir: Path | None) -> GuestConfig:
    builtin = r.string("builtin")
    image = r.string("image")
    if (builtin is None) == (image is None):
        raise ConfigError(f"{r.prefix}: set exactly one of 'builtin' or 'image'")
    if builtin is not None:
        if builtin not in BUILTIN_DEFAULTS:
            known = ", ".join(sorted(BUILTIN_DEFAULTS))
            raise ConfigError(f"{r.path('builtin')}: expected one of {known}, got {builtin!r}")
        defaults = BUILTIN_DEFAULTS[builtin]
        for key in ("entry_offset", "params"):
            if key in r.data:
                raise ConfigError(f"{r.path(key)}: only valid with 'image', not 'builtin'")
        r.seen.update(("hot_set_mib", "hot_set_pages"))
        if "hot_set_mib" in r.data and "hot_set_pages" in r.data:
            raise ConfigError(f"{r.prefix}: set at most one of 'hot_set_mib' or 'hot_set_pages'")
        if "hot_set_mib" in r.data:
            hot_set_pages = r.integer("hot_set_mib", minimum=1) * (MiB // PAGE_SIZE)
        else:
            hot_set_pages = r.integer("hot_set_pages", default=defaults["hot_set_pages"], minimum=1)
        fill_percent = r.integer("fill_percent", default=defaults["fill_percent"], minimum=0)
        if fill_percent > 100:
            raise ConfigError(f"{r.path('fill_percent')}: expected 0..100, got {fill_percent}")
        guest = GuestConfig(
            builtin=builtin,
            hot_set_pages=hot_set_pages,
            writes_per_s=r.integer("writes_per_s", default=defaults["writes_per_s"], minimum=0),
            verify_every_writes=r.integer(
                "verify_every_writes", default=defaults["verify_every_writes"], minimum=0
            ),
            fill_percent=fill_percent,
            seed=r.integer("seed", default=defaults["seed"], minimum=0),
        )
    else:
        assert image is not None
        for key in BUILTIN_DEFAULTS["memstress"].keys() | {"hot_set_mib"}:
            if key in r.data:
                raise ConfigError(f"{r.path(key)}: only valid with 'builtin', not 'image'")
        path = Path(image)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        raw_params = r.data.get("params", [])
        if not isinstance(raw_params, list) or len(raw_params) > PARAMS_MAX:
            raise ConfigError(
                f"{r.path('params')}: expected a list of at most {PARAMS_MAX} integers"
            )
        params = []
        for i, value in enumerate(raw_params):
            if not _is_int(value) or not 0 <= value <= U64_MAX:
                raise ConfigError(
                    f"{r.path('params')}[{i}]: expected an integer 0..2^64-1, got {value!r}"
                )
            params.append(value)
        r.seen.add("params")
        guest = GuestConfig(
            builtin=None,
            image=str(path),
            entry_offset=r.integer("entry_offset", default=0, minimum=0),
            params=tuple(params),
        )
    r.finish()
    return guest


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Reader:
    """Reads keys of one TOML table, remembering which were used."""

    def __init__(self, data: object, prefix: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix}: expected a table, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.prefix = prefix
        self.seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def string(self, key: str, *, default: str | None = None, required: bool = False) -> str | None:
        self.seen.add(key)
        if key not in self.data:
            if required:
                raise ConfigError(f"{self.path(key)}: missing (required)")
            return default
        value = self.data[key]
        if not isinstance(value, str):
            raise ConfigError(f"{self.path(key)}: expected a string, got {value!r}")
        return value

    def integer(self, key: str, *, default: int | None = None, minimum: int = 0) -> int:
        self.seen.add(key)
        if key not in self.data:
            if default is None:
                raise ConfigError(f"{self.path(key)}: missing (required)")
            return default
        value = self.data[key]
        if not (_is_int(value) and minimum <= value <= U64_MAX):
            kind = "a positive integer" if minimum >= 1 else "a non-negative integer"
            raise ConfigError(f"{self.path(key)}: expected {kind}, got {value!r}")
        return int(value)

    def table(self, key: str) -> _Reader:
        self.seen.add(key)
        if key not in self.data:
            raise ConfigError(f"{self.path(key)}: missing (required table)")
        return _Reader(self.data[key], self.path(key))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen))
            raise ConfigError(f"{self.path(unknown[0])}: unknown key (known: {known})")
