"""docs/architecture.md's import rules, read from the source with `ast` (nothing is imported or run):

- the engine imports no Ray: no module under `qllm_core/` imports `ray`, at any depth of its code;
- the HTTP side imports no torch: the HTTP modules of `deployments/`, and every project module they load at
  import time, import no `torch` or `transformers` at module level (an import inside a function runs only when
  called, and one under `if TYPE_CHECKING:` never does; `qllm_core/__init__.py`'s lazy exports are followed to
  the module each name lives in, as `from qllm_core import PriorityClass` loads `qllm_core.request`);
- no import cycles among the project's modules through module-level imports.

Each failure names the offending chain, file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = {ROOT: ("qllm_core", "deployments", "benchmarks"), ROOT / "k8s": ("qllm_k8s", "generate")}
"""Where module names start (k8s/ is its own root: `generate.py` imports `qllm_k8s`), and the top-level
modules or packages under each that belong to the project."""

HTTP_SIDE = tuple(
    f"deployments.{name}"
    for name in (
        "openai_api",
        "openai_requests",
        "openai_responses",
        "protocol",
        "settings",
        "load",
        "router",
        "request_router",
        "ingress",
    )
)
MODEL_STACK = ("torch", "transformers")
LAZY_EXPORTS = "_HOMES"
"""The name of a package's map of lazily exported names to the modules they live in (qllm_core/__init__.py)."""


@dataclass(frozen=True)
class Import:
    """One import statement's target, where it stands and whether it runs when the module is imported."""

    target: str
    """The module it loads: a project module, or a library's dotted name."""
    path: Path
    line: int
    at_import_time: bool
    """False inside a function body or under `if TYPE_CHECKING:`."""

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclass
class Project:
    """Every project module's source file and imports."""

    files: dict[str, Path] = field(default_factory=dict)
    imports: dict[str, list[Import]] = field(default_factory=dict)

    def is_module(self, name: str) -> bool:
        return name in self.files

    def edges(self, module: str) -> Iterator[Import]:
        """The module-level imports of `module` that load a project module (package __init__s included)."""
        for imp in self.imports.get(module, ()):
            if imp.at_import_time and self.is_module(imp.target):
                yield imp


def _module_name(source_root: Path, path: Path) -> str:
    parts = path.relative_to(source_root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST, at_import_time: bool = True) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import under `node`, with whether it runs at import time."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, at_import_time
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _import_nodes(child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), False)
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), at_import_time)
        else:
            yield from _import_nodes(child, at_import_time)


def _lazy_homes(tree: ast.Module, package: str) -> dict[str, str]:
    """A package's lazy exports (`_HOMES = {"Engine": "engine", ...}`) as name -> module."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == LAZY_EXPORTS for t in node.targets):
            return {name: f"{package}.{home}" for name, home in ast.literal_eval(node.value).items()}
    return {}


def _scan() -> Project:
    project = Project()
    trees: dict[str, ast.Module] = {}
    for source_root, tops in SOURCE_ROOTS.items():
        for top in tops:
            paths = [source_root / f"{top}.py"] if (source_root / f"{top}.py").is_file() else []
            paths += sorted((source_root / top).rglob("*.py")) if (source_root / top).is_dir() else []
            for path in paths:
                name = _module_name(source_root, path)
                project.files[name] = path
                trees[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    homes = {name: _lazy_homes(tree, name) for name, tree in trees.items() if project.files[name].stem == "__init__"}
    for name, tree in trees.items():
        package = name if project.files[name].stem == "__init__" else name.rpartition(".")[0]
        project.imports[name] = [
            Import(target, project.files[name], node.lineno, at_import_time)
            for node, at_import_time in _import_nodes(tree)
            for target in _targets(node, package, project, homes)
        ]
    return project


def _targets(
    node: ast.Import | ast.ImportFrom, package: str, project: Project, homes: dict[str, dict[str, str]]
) -> Iterator[str]:
    """The modules an import statement loads: for `from P import n`, the module `P.n` when there is one,
    the module a lazy export `n` lives in, else `P` itself."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, *([base] if base else [])])
    yield base
    for alias in node.names:
        if project.is_module(f"{base}.{alias.name}"):
            yield f"{base}.{alias.name}"
        elif alias.name in homes.get(base, {}):
            yield homes[base][alias.name]


PROJECT = _scan()


def _parents(module: str) -> Iterator[str]:
    """The packages Python runs before `module` (`a` and `a.b` for `a.b.c`)."""
    parts = module.split(".")
    yield from (".".join(parts[:i]) for i in range(1, len(parts)))


def _loaded_at_import(root: str) -> dict[str, list[str]]:
    """Every project module importing `root` loads, each with the chain that loads it (root first)."""
    chains = {root: [root]}
    todo = [root]
    while todo:
        module = todo.pop(0)
        following = [imp.target for imp in PROJECT.edges(module)]
        following += [p for imp in PROJECT.edges(module) for p in _parents(imp.target)]
        for target in following:
            if target not in chains and PROJECT.is_module(target):
                chains[target] = [*chains[module], target]
                todo.append(target)
    return chains


def _imports_of(module: str, libraries: tuple[str, ...], at_import_time_only: bool) -> list[Import]:
    return [
        imp
        for imp in PROJECT.imports[module]
        if imp.target.split(".")[0] in libraries and (imp.at_import_time or not at_import_time_only)
    ]


def test_the_scan_sees_the_project_and_its_lazy_exports() -> None:
    # Guards the checks below against passing for want of anything to check.
    assert {"qllm_core.engine", "deployments.ingress", "benchmarks.cli", "qllm_k8s.files"} <= set(PROJECT.files)
    assert all(module in PROJECT.files for module in HTTP_SIDE)
    ingress_loads = _loaded_at_import("deployments.ingress")
    assert "qllm_core.request" in ingress_loads  # through `from qllm_core import PriorityClass`, a lazy export
    assert "qllm_core.engine" not in ingress_loads
    assert "qllm_core.engine" in _loaded_at_import("deployments.replica")  # `from qllm_core import Engine`
    assert any(imp.target == "torch" for imp in PROJECT.imports["qllm_core.forward"])


def test_the_engine_imports_no_ray() -> None:
    found = [
        f"{imp.where()} imports {imp.target}"
        for module in PROJECT.files
        if module.split(".")[0] == "qllm_core"
        for imp in _imports_of(module, ("ray",), at_import_time_only=False)
    ]
    assert not found, "qllm_core/ must not import Ray (docs/architecture.md, import rules):\n" + "\n".join(found)


@pytest.mark.parametrize("root", HTTP_SIDE)
def test_the_http_side_imports_no_torch_or_transformers(root: str) -> None:
    # Shortest chains first (the walk is breadth-first), one per module that imports the stack, the first few.
    found = [
        f"{' -> '.join(chain)} -> {imps[0].target} ({imps[0].where()})"
        for module, chain in _loaded_at_import(root).items()
        if (imps := _imports_of(module, MODEL_STACK, at_import_time_only=True))
    ]
    shown = "\n".join(found[:5]) + (f"\n(+{len(found) - 5} more modules)" if len(found) > 5 else "")
    assert not found, f"importing {root} loads the model stack (docs/architecture.md):\n{shown}"


def _cycles() -> list[list[str]]:
    """The import cycles among project modules (module-level imports), one chain per strongly connected
    component of two or more modules (or one importing itself), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in {imp.target for imp in PROJECT.edges(module)} - {module}:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while (member := stack.pop()) != module:
                component.append(member)
            component.append(module)
            if len(component) > 1:
                found.append(_cycle_through(set(component)))

    for module in sorted(PROJECT.files):
        if module not in index:
            visit(module)
    return found


def _cycle_through(component: set[str]) -> list[str]:
    """The shortest closed chain from the component's first module back to it, each step with its line."""
    start = min(component)
    previous: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        module = todo.pop(0)
        for imp in PROJECT.edges(module):
            if imp.target == start:
                chain = [module]
                while (before := previous[chain[-1]]) is not None:
                    chain.append(before)
                chain.reverse()
                steps = zip(chain, [*chain[1:], start], strict=True)
                return [f"{m} ({_line(m, n)})" for m, n in steps] + [start]
            if imp.target in component and imp.target not in previous:
                previous[imp.target] = module
                todo.append(imp.target)
    raise AssertionError(f"no cycle through {start}, though it is in a strongly connected component")


def _line(module: str, target: str) -> str:
    imp = next(imp for imp in PROJECT.edges(module) if imp.target == target)
    return imp.where()


def test_no_import_cycles_among_project_modules() -> None:
    cycles = _cycles()
    assert not cycles, "module-level import cycles (break one edge: move it into a function or a lower module):\n" + (
        "\n".join(" -> ".join(c) for c in cycles)
    )
