"""The layout of the project, checked from its source (``ast``) and from an install.

1. Installing adds exactly one top-level import name, ``finetune_ref``; nothing in the repository imports a room by
   its bare folder name (``import models`` works only from inside the checkout, and shadows PyPI packages).
2. Imports point one way: each room (a top-level folder, installed as ``finetune_ref.<room>``) imports only the
   rooms listed for it in ``ALLOWED``: the model, LoRA, kernels, optimizer, NF4 and GPTQ rooms never import the
   loop, the recipes or the CLI, and no two rooms import each other.
3. One concept, one place: the NF4 table is written down in one library file.
4. No library file is longer than 400 lines.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "finetune_ref"
MAX_LINES = 400
NF4_TABLE_ENTRY = "0.6961928009986877"  # the second NF4 value (QLoRA, section 3)

# Room -> the rooms it may import. Lower rooms first; a room may import only rooms above it in this table.
ALLOWED = {
    "models": set(),
    "lora": {"models"},
    "kernels": set(),
    "optim": set(),
    "qlora": {"models", "lora", "kernels", "optim"},
    "gptq": {"models"},
    "full": {"models", "optim"},
    "train": {"models", "lora", "kernels", "optim", "qlora", "gptq", "full"},
    "recipes": {"models", "lora", "kernels", "optim", "qlora", "gptq", "full", "train"},
    "parity": {"models", "lora", "kernels", "optim", "qlora"},
    "serve": {"models", "lora", "kernels", "optim", "qlora", "gptq", "full", "train", "recipes"},
    "cli": {"models", "lora", "kernels", "optim", "qlora", "gptq", "full", "train", "recipes", "parity", "serve"},
}


def setup_rooms() -> list[str]:
    """The ROOMS list of setup.py (the folders mapped into the package), read without running setup.py."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ROOMS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no ROOMS list")


def library_files() -> list[pathlib.Path]:
    files = [p for room in ALLOWED for p in sorted((ROOT / room).glob("*.py"))]
    return files + sorted((ROOT / PACKAGE).glob("*.py"))


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in a file, relative imports resolved against its room."""
    room = path.parent.name
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .x import y, inside finetune_ref.<room>
                base = [PACKAGE, room][: 3 - node.level] if node.level <= 2 else []
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from finetune_ref import kernels` imports the room itself.
            names = [f"{module}.{a.name}" for a in node.names] if module == PACKAGE else [module]
            out += [(node.lineno, n) for n in names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def test_rooms_are_the_packages_setup_installs():
    assert set(setup_rooms()) == set(ALLOWED), "setup.py's ROOMS and this test's ALLOWED must name the same rooms"
    for room in ALLOWED:
        assert (ROOT / room / "__init__.py").is_file(), f"{room}/ is not a package"


def test_installing_adds_exactly_one_import_name(tmp_path):
    target = tmp_path / "site"
    # Built in pip's isolated build environment, as users build it (a venv's own setuptools may lack bdist_wheel).
    # Without isolation, setup.py keeps the checkout off sys.path: Hugging Face's `kernels` package (transformers
    # >= 5.25 requires it) hooks setuptools' egg-info step with an import of `kernels`, which our folder would shadow.
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                             "--no-compile", "--target", str(target), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    names = sorted(p.name for p in target.iterdir()
                   if not p.name.endswith((".dist-info", ".egg-info")) and p.name not in ("bin", "__pycache__"))
    assert names == [PACKAGE], names
    installed_rooms = sorted(p.name for p in (target / PACKAGE).iterdir() if (p / "__init__.py").is_file())
    assert installed_rooms == sorted(ALLOWED)
    # the ready run files (`finetune train --config qlora`) are package data
    shipped = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    assert shipped and sorted(p.name for p in (target / PACKAGE / "recipes").glob("*.yaml")) == shipped


def test_nothing_imports_a_room_by_its_bare_folder_name():
    scanned = library_files() + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in scanned for line, name in imported_modules(p)
           if name.split(".")[0] in ALLOWED]
    assert not bad, "import these through finetune_ref:\n" + "\n".join(bad)


def test_imports_point_one_way():
    bad = []
    for p in library_files():
        room = p.parent.name
        if room == PACKAGE:
            continue  # the package root: its docstring and `python -m finetune_ref`
        for line, name in imported_modules(p):
            parts = name.split(".")
            if parts[0] != PACKAGE or len(parts) < 2 or parts[1] == room:
                continue
            if parts[1] not in ALLOWED[room]:
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {name} ({room} may import only "
                           f"{sorted(ALLOWED[room]) or 'nothing of ours'})")
    assert not bad, "\n".join(bad)


def test_allowed_imports_have_no_cycle():
    order = list(ALLOWED)
    for room, allowed in ALLOWED.items():
        assert all(order.index(a) < order.index(room) for a in allowed), room


def test_the_nf4_table_is_written_once():
    holders = [str(p.relative_to(ROOT)) for p in library_files() if NF4_TABLE_ENTRY in p.read_text()]
    assert len(holders) == 1, holders


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_file_is_at_most_400_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines; split it along the jobs it does"
