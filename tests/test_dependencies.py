"""The plain install (`pip install -e .`, what scripts/install.sh does without --dev) brings every module the
product and its benchmarks import (save optional ones behind `except ImportError`): each README command
works after the README's own install."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qllm_core", "deployments", "benchmarks")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _guards_import_error(node: ast.Try) -> bool:
    names = {"ImportError", "ModuleNotFoundError"}
    return any(isinstance(h.type, ast.Name) and h.type.id in names for h in node.handlers)


def _imports(node: ast.AST) -> set[str]:
    """Top-level module names imported under `node`, except inside `try: ... except ImportError` (an
    optional dependency, refused with a message when it is missing)."""
    if isinstance(node, ast.Try) and _guards_import_error(node):
        return set().union(*(_imports(n) for n in [*node.handlers, *node.orelse, *node.finalbody]))
    if isinstance(node, ast.Import):
        return {alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return {node.module.split(".")[0]}
    return set().union(*(_imports(n) for n in ast.iter_child_nodes(node)))


def _imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            names |= _imports(ast.parse(path.read_text(encoding="utf-8")))
    return {n for n in names if n not in sys.stdlib_module_names and n not in PACKAGES}


def _installed_by(requirements: list[str]) -> set[str]:
    """Distributions a plain install of `requirements` brings, transitively (with the extras asked for)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _normal(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        extras = ["", *sorted(req.extras)]
        for line in requires:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    return seen


def test_every_third_party_module_the_product_imports_comes_with_the_plain_install() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    installed = _installed_by(project["dependencies"])
    providers = metadata.packages_distributions()
    missing = {
        module: providers.get(module)
        for module in _imported_top_level_modules()
        if not any(_normal(dist) in installed for dist in providers.get(module, [module]))
    }
    assert missing == {}, f"imported, but only a dev extra (or nothing) installs them: {missing}"
