"""VmConfig parsing: good examples, unknown keys, bad values (pure, no KVM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrated.errors import ConfigError
from migrated.vmm.config import VmConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def parse(text: str) -> VmConfig:
    return VmConfig.from_toml(text)


MINIMAL = 'name = "vm1"\n[guest]\nbuiltin = "memstress"\n'


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_examples_parse(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.memory_mib == 256
    assert cfg.vcpus == 1
    assert cfg.guest.builtin in ("memstress", "idle")


def test_memstress_example_values() -> None:
    cfg = load_config(CONFIGS / "memstress.toml")
    assert cfg.guest.hot_set_pages == 16 * 256
    assert cfg.guest.boot_params(cfg.vcpus) == (4096, 0, 0, 100, 1)


def test_idle_defaults_sleep_slowly() -> None:
    cfg = parse('name = "i"\n[guest]\nbuiltin = "idle"\n')
    assert cfg.guest.hot_set_pages == 4
    assert cfg.guest.writes_per_s == 10


def test_defaults_and_generated_uuid() -> None:
    a, b = parse(MINIMAL), parse(MINIMAL)
    assert (a.memory_mib, a.vcpus, a.console, a.cpl) == (256, 1, "none", 3)
    assert a.uuid != b.uuid


def test_hot_set_split_among_vcpus() -> None:
    cfg = parse('name = "v"\nvcpus = 3\n[guest]\nbuiltin = "memstress"\nhot_set_pages = 10\n')
    assert cfg.guest.boot_params(3)[0] == 4  # ceil(10 / 3)


def test_to_dict_round_trips() -> None:
    cfg = parse(MINIMAL + "hot_set_mib = 2\nseed = 7\nverify_every_writes = 99\n")
    assert VmConfig.from_dict(cfg.to_dict()) == cfg
    img = parse('name = "x"\n[guest]\nimage = "/tmp/a.bin"\nentry_offset = 2\nparams = [1, 2]\n')
    assert VmConfig.from_dict(img.to_dict()) == img
    assert img.guest.boot_params(1) == (1, 2)


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "vm.toml").write_text('name = "x"\nconsole = "out.log"\n[guest]\nimage = "g.bin"\n')
    cfg = load_config(tmp_path / "vm.toml")
    assert cfg.guest.image == str(tmp_path / "g.bin")
    assert cfg.console == str(tmp_path / "out.log")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "hot_set_mib = -3\n", "guest.hot_set_mib: expected a positive integer, got -3"),
        (MINIMAL + "colour = 1\n", "guest.colour: unknown key"),
        ('name = "v"\nbogus = 1\n[guest]\nbuiltin = "idle"\n', "bogus: unknown key"),
        ('name = "v"\nmemory_mib = 3\n[guest]\nbuiltin = "idle"\n', "memory_mib: expected an even"),
        ('name = "v"\nmemory_mib = "1G"\n[guest]\nbuiltin = "idle"\n', "memory_mib: expected"),
        ('name = "v"\nvcpus = 9\n[guest]\nbuiltin = "idle"\n', "vcpus: expected 1..8"),
        ('name = "v"\nvcpus = 0\n[guest]\nbuiltin = "idle"\n', "vcpus: expected a positive"),
        ('name = "v"\ncpl = 1\n[guest]\nbuiltin = "idle"\n', "cpl: expected 3"),
        ('name = "v"\nuuid = "nope"\n[guest]\nbuiltin = "idle"\n', "uuid: expected a UUID"),
        ('name = "a b"\n[guest]\nbuiltin = "idle"\n', "name: expected"),
        ('[guest]\nbuiltin = "idle"\n', "name: missing"),
        ('name = "v"\n', "guest: missing"),
        ('name = "v"\nguest = 3\n', "guest: expected a table"),
        ('name = "v"\n[guest]\nbuiltin = "nosuch"\n', "guest.builtin: expected one of"),
        ('name = "v"\n[guest]\n', "guest: set exactly one of 'builtin' or 'image'"),
        ('name = "v"\n[guest]\nbuiltin = "idle"\nimage = "x"\n', "guest: set exactly one"),
        (MINIMAL + "fill_percent = 101\n", "guest.fill_percent: expected 0..100"),
        (MINIMAL + "writes_per_s = 1.5\n", "guest.writes_per_s: expected a non-negative integer"),
        (MINIMAL + "writes_per_s = true\n", "guest.writes_per_s: expected"),
        (MINIMAL + "hot_set_mib = 1\nhot_set_pages = 1\n", "set at most one of"),
        (MINIMAL + "entry_offset = 1\n", "guest.entry_offset: only valid with 'image'"),
        ('name = "v"\n[guest]\nimage = "x"\nseed = 1\n', "guest.seed: only valid with 'builtin'"),
        ('name = "v"\n[guest]\nimage = "x"\nparams = [-1]\n', "guest.params[0]: expected"),
        ('name = "v"\n[guest]\nimage = "x"\nparams = 5\n', "guest.params: expected a list"),
        ('name = "v"\nconsole = ""\n[guest]\nbuiltin = "idle"\n', "console: expected"),
        ("name = = 1\n", "invalid TOML"),
    ],
)
def test_bad_configs_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert message in str(info.value)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
