"""The architecture as the import graph shows it: layers import downwards only, nothing by string, and the
installed names live under ``dropwise``.

Layers, bottom to top: ``dropwise.errors`` < ``dropwise.package`` < ``dropwise.models`` <
``dropwise.surgery`` < ``dropwise.service`` < the command line (``dropwise.cli``, ``dropwise.commands``,
``dropwise.zoo_training``). Every import of a project module, at module level or inside a function, is
checked against that order.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"dropwise": "dropwise", "package": "dropwise.package", "models": "dropwise.models",
           "surgery": "dropwise.surgery", "service": "dropwise.service"}  # fmt: skip
LAYERS = ("dropwise.errors", "dropwise.package", "dropwise.models", "dropwise.surgery", "dropwise.service", "cli")


def _layer(module: str) -> int:
    for rank, prefix in enumerate(LAYERS[:-1]):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    if module in ("dropwise", "dropwise.cli", "dropwise.zoo_training") or module.startswith("dropwise.commands"):
        return len(LAYERS) - 1
    raise AssertionError(f"{module} belongs to no layer")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "dropwise" and parts and parts[0] in ("package", "models", "surgery", "service"):
                continue
            out.append((".".join([package, *parts]), path))
    return out


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = module.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((name, node.lineno))
    return found


MODULES = _modules()


def test_every_layer_holds_modules() -> None:
    ranks = {_layer(name) for name, _ in MODULES}
    assert ranks == set(range(len(LAYERS))), ranks


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_imports_go_down_the_layers(module: str, path: Path) -> None:
    own = _layer(module)
    upward = []
    for name, line in _imports(path, module):
        for generic in ("models", "surgery", "service", "package"):
            assert name != generic and not name.startswith(generic + "."), f"{path}:{line} imports {name}"
        if name.startswith("dropwise") and _layer(name) > own:
            upward.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not upward, "imports go up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_no_project_module_is_imported_by_string(module: str, path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
            "find_spec",
        ):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    assert not arg.value.startswith("dropwise"), f"{path}:{node.lineno} imports {arg.value} by string"


@pytest.mark.slow
def test_the_wheel_installs_only_the_dropwise_namespace(tmp_path: Path) -> None:
    """A built wheel holds ``dropwise/`` and its metadata, no generic top-level module (``models``...)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dropwise-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"dropwise"}, top
    for sub in ("package", "models/layers", "models/zoo", "surgery", "service/routes", "service/runtimes", "commands"):
        assert any(name.startswith(f"dropwise/{sub}/") for name in names), sub
