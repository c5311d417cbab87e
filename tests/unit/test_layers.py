"""Layers import downward only (the README's diagram is this table).

Every module of the package belongs to a layer; a module may import its own layer and
the layers below it, never one above.  Imports inside functions count too (that is
how cycles hide).  ``TYPE_CHECKING`` imports count as well: a type that needs a higher
layer is a design smell worth seeing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "migrated"

#: Layer of each top-level package or module, bottom (0) up.
LAYERS: dict[str, int] = {
    "errors": 0,
    "log": 0,
    "protocol": 1,
    "kernel": 1,
    "guests": 1,
    "vmm": 2,
    "transport": 3,
    "engine": 4,
    "service": 5,
    "ui": 6,
    "demo": 7,
    "cli": 8,
    "__main__": 9,
}
#: Layers that must not know each other although neither is above the other.
APART = {frozenset({"protocol", "kernel"}), frozenset({"protocol", "guests"})}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "migrated":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = ".".join(("migrated", *path.relative_to(ROOT).parent.parts))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                found.append(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                found.append(node.module)
    return found


MODULES = sorted(p for p in ROOT.rglob("*.py") if p.name != "_build.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_downward(path: Path) -> None:
    rel = path.relative_to(ROOT)
    me = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    if me == "__init__":
        return
    assert me in LAYERS, f"{rel}: unknown layer {me!r}; add it to LAYERS and the README"
    for module in _imports(path):
        other = _part(module)
        if other is None or other in ("__init__", me):
            continue
        assert other in LAYERS, f"{rel} imports {module}: unknown layer"
        assert LAYERS[other] <= LAYERS[me], f"{rel} ({me}) imports {module} ({other}): upward"
        assert frozenset({me, other}) not in APART, f"{rel} imports {module}: they are apart"


def test_only_the_kernel_layer_touches_cffi() -> None:
    for path in MODULES:
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "kernel":
            continue
        for module in _imports(path):
            assert not module.startswith("cffi"), f"{rel} imports {module}"
            assert "_native" not in module and not module.endswith("kernel._util"), (
                f"{rel} imports {module}: the cffi lib belongs to the kernel layer"
            )


def test_nothing_above_vmm_reaches_into_the_kvm_objects() -> None:
    """Engines and services use Machine's API (dirty_log, spare_vcpu), not machine.vm."""
    for path in MODULES:
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("kernel", "vmm"):
            continue
        text = path.read_text()
        for needle in ("machine.vm.", ".vm.check_extension", ".vm.create_vcpu"):
            assert needle not in text, f"{rel} uses {needle}"
