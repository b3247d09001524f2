"""The layering of the packages: every module imports only its own layer and the layers below it.

    lightning_modules/   serve > demo > cli > training > evaluation > student   (inside, by subpackage)
    teachers/            may import datamodules/, renderers/
    datamodules/         may import renderers/
    renderers/           imports none of the others

Every import statement counts, also those inside functions and `if TYPE_CHECKING:` blocks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("renderers", "datamodules", "teachers", "lightning_modules")
# package -> the project packages its modules may import (besides itself)
ALLOWED = {
    "renderers": set(),
    "datamodules": {"renderers"},
    "teachers": {"renderers", "datamodules"},
    "lightning_modules": {"renderers", "datamodules", "teachers"},
}
# lightning_modules' subpackages, bottom first: each may import the ones before it
SUBPACKAGES = ("student", "evaluation", "training", "cli", "demo", "serve")


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the source of `module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                parts = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            # `from pkg import sub` may import the submodule pkg.sub: judge it by its full name
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def rank(module: str) -> tuple[int, int] | None:
    """(package rank, subpackage rank) of a project module, None for anything outside the project."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    sub = SUBPACKAGES.index(parts[1]) if parts[0] == "lightning_modules" and len(parts) > 1 and parts[1] in SUBPACKAGES else -1
    return PACKAGES.index(parts[0]), sub


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Imports of `module` that go up (or sideways into a package it may not use)."""
    own_package = module.split(".")[0]
    own_sub = rank(module)[1]
    bad = []
    for line, target in imported_modules(source, module, is_package):
        target_rank = rank(target)
        if target_rank is None:
            continue
        package = target.split(".")[0]
        if package != own_package and package not in ALLOWED[own_package]:
            bad.append(f"{module}:{line} imports {target} ({own_package}/ may not import {package}/)")
        elif package == own_package == "lightning_modules" and target_rank[1] > own_sub >= 0:
            bad.append(
                f"{module}:{line} imports {target} (lightning_modules.{SUBPACKAGES[own_sub]} is below "
                f"lightning_modules.{SUBPACKAGES[target_rank[1]]})"
            )
        elif package == own_package == "lightning_modules" and own_sub < 0 and target_rank[1] >= 0:
            bad.append(f"{module}:{line} imports {target} (lightning_modules/__init__.py imports nothing)")
    return bad


def project_modules() -> list[tuple[str, Path]]:
    modules = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.append((".".join(parts), path))
    return modules


def test_every_module_imports_only_downwards():
    modules = project_modules()
    assert len(modules) > 40 and {m for m, _ in modules} >= {"renderers.types", "lightning_modules.cli.main"}
    problems = [
        problem
        for module, path in modules
        for problem in violations(module, path.read_text(encoding="utf-8"), path.name == "__init__.py")
    ]
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_every_lightning_modules_file_sits_in_a_role_subpackage():
    loose = [p.name for p in (ROOT / "lightning_modules").glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the role subpackages {SUBPACKAGES}: {loose}"
    subpackages = {p.name for p in (ROOT / "lightning_modules").iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(SUBPACKAGES)
    for name in SUBPACKAGES:  # each says in one paragraph what it holds
        doc = ast.get_docstring(ast.parse((ROOT / "lightning_modules" / name / "__init__.py").read_text()))
        assert doc and len(doc) > 100, name


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("teachers.base", "from lightning_modules.cli import UserError", "teachers/ may not import lightning_modules/"),
        ("renderers.cameras", "def f():\n    import teachers.shapes", "renderers/ may not import teachers/"),
        ("datamodules.prompts", "from teachers import schedules", "datamodules/ may not import teachers/"),
        ("lightning_modules.student.weights", "from lightning_modules.training import settings", "is below"),
        ("lightning_modules.evaluation.run", "from ..cli.main import main", "is below"),
        ("teachers.base", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lightning_modules.student import X",
         "may not import"),
    ],
)
def test_the_rule_catches_upward_imports(module, source, expected):
    found = violations(module, source)
    assert len(found) == 1 and expected in found[0]


def test_the_rule_lets_downward_imports_pass():
    source = (
        "import torch\nfrom renderers.errors import UserError\nfrom teachers.schedules import Schedule\n"
        "from lightning_modules.student import TriplaneStudent\nfrom lightning_modules.evaluation import clip_score\n"
    )
    assert violations("lightning_modules.training.prd_module", source) == []
    assert violations("teachers.base", "from renderers.types import RenderOutput\nfrom . import objectives") == []
