"""The layers stay layers: no import circles among the project's modules, the torch-free core (servable/)
and serving (serving/) never reach training or torch, the core never reaches serving, and serving builds
no class with `type(...)` at import time (a class someone can read, grep and type-check instead).

Standard library only: the project's own .py files are read with `ast`, so the check runs without the
virtualenv's heavy packages. Function-level imports count like module-level ones (they run all the same,
only later); imports under `if TYPE_CHECKING:` do not (they never run). Relative imports are resolved.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folders that hold no project code: the virtualenv, run outputs, caches and build output.
SKIP = {".venv", "runs", "build", "dist", "node_modules", "__pycache__"}


@dataclass
class Graph:
    root: Path
    files: dict[str, Path] = field(default_factory=dict)  # module -> file
    # module -> imported project module -> first line; and module -> external top-level names -> first line
    edges: dict[str, dict[str, int]] = field(default_factory=dict)
    external: dict[str, dict[str, int]] = field(default_factory=dict)

    def where(self, module: str, line: int) -> str:
        return f"{self.files[module].relative_to(self.root).as_posix()}:{line}"


def module_name(root: Path, path: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def project_files(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIP or p.startswith(".") for p in parts[:-1]):
            continue
        found[module_name(root, path)] = path
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Every import statement that can run, at any depth, as (absolute target names, line)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[list[str], int]] = []

    def visit_If(self, node: ast.If) -> None:
        if _type_checking(node.test):
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append(([a.name for a in node.names], node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".") if self.package else []
            base = ".".join(parts[: len(parts) - node.level + 1])  # level 1: this package, 2: its parent
            source = ".".join(p for p in (base, node.module or "") if p)
        else:
            source = node.module or ""
        # `from X import a`: X runs, and X.a too when it is a submodule.
        self.found.append(([source, *(f"{source}.{a.name}" for a in node.names if a.name != "*")], node.lineno))


def build(root: Path = ROOT) -> Graph:
    graph = Graph(root, project_files(root))
    for module, path in graph.files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(tree)
        edges, external = graph.edges.setdefault(module, {}), graph.external.setdefault(module, {})
        for names, line in visitor.found:
            for name in names:
                target = _project_module(graph.files, name)
                if target is None:
                    external.setdefault(name.split(".")[0], line)
                elif target != module:
                    edges.setdefault(target, line)
    return graph


def _project_module(files: dict[str, Path], name: str) -> str | None:
    """The project module `name` runs: itself, or for `pkg.mod.attr` the longest prefix that is a module.
    A name whose top level is not the project's is external."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in files:
            return ".".join(parts[:n])
    return None


def circles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as one concrete circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph.edges):
        if v not in index:
            visit(v)
    out = []
    for component in components:
        start = min(component)
        path = _path(graph, start, lambda m, start=start: m == start, within=component, first_step=True)
        out.append(path or sorted(component))
    return out


def _path(graph: Graph, start: str, goal, within: set[str] | None = None, first_step: bool = False) -> list[str]:
    """Shortest import chain from `start` to a module meeting `goal` (breadth first), [] if none."""
    came: dict[str, str] = {}
    queue = deque([start])
    seen = set() if first_step else {start}
    if not first_step and goal(start):
        return [start]
    while queue:
        v = queue.popleft()
        for w in sorted(graph.edges[v]):
            if within is not None and w not in within:
                continue
            if goal(w):
                chain = [w, v]
                while chain[-1] != start:
                    chain.append(came[chain[-1]])
                return chain[::-1]
            if w not in seen:
                seen.add(w)
                came[w] = v
                queue.append(w)
    return []


def describe(graph: Graph, chain: list[str]) -> str:
    steps = [f"{a} -> {b} ({graph.where(a, graph.edges[a][b])})" for a, b in pairwise(chain)]
    return "\n  ".join(steps)


def _in(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def forbidden_reaches(graph: Graph, packages: tuple[str, ...], modules: tuple[str, ...], externals: tuple[str, ...]):
    """For each module of `packages`: the import chain to a project module in `modules`, or to a module that
    imports one of `externals`, directly or through any number of the project's modules."""

    def bad(m: str) -> bool:
        return any(_in(p, m) for p in modules) or any(e in graph.external[m] for e in externals)

    problems = []
    for module in sorted(graph.files):
        if not any(_in(p, module) for p in packages):
            continue
        chain = _path(graph, module, bad)
        if chain:
            last = chain[-1]
            hit = [e for e in externals if e in graph.external[last]]
            steps = [describe(graph, chain)] if len(chain) > 1 else []
            if hit:
                steps.append(f"{last} imports {hit[0]} ({graph.where(last, graph.external[last][hit[0]])})")
            problems.append(f"{module}:\n  " + "\n  ".join(steps))
    return problems


def classes_built_with_type(graph: Graph, package: str) -> list[str]:
    """Calls `type(name, bases, namespace)` that run at import: module level or in a class body, not in a
    function (which runs only when called)."""
    found = []
    for module, path in sorted(graph.files.items()):
        if not _in(package, module):
            continue
        todo: deque[ast.AST] = deque(ast.parse(path.read_text()).body)
        while todo:
            node = todo.popleft()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(node, ast.Call) and _is_type(node.func) and len(node.args) + len(node.keywords) >= 3:
                found.append(f"{graph.where(module, node.lineno)}: {ast.unparse(node)[:100]}")
            todo.extend(ast.iter_child_nodes(node))
    return found


def _is_type(func: ast.expr) -> bool:
    """`type` or `builtins.type` (the one-argument form asks an object's type; three arguments build a class)."""
    if isinstance(func, ast.Name):
        return func.id == "type"
    return isinstance(func, ast.Attribute) and func.attr == "type" and ast.unparse(func.value) == "builtins"


# ---------------------------------------------------------------- the rules


def test_the_scan_sees_the_project():
    graph = build()
    assert {"servable.artifact", "serving.playground", "training.run_dir", "deploy.launch", "tests.conftest"} <= set(
        graph.files
    )
    assert "servable.artifact" in graph.edges["training.run_dir"]  # a module-level import
    assert "training.review" in graph.edges["training.__main__"]  # a function-level one
    assert "torch" in graph.external["training.image_pipeline"]


def test_no_import_circles():
    graph = build()
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join("  " + describe(graph, c) for c in found)


def test_core_and_serving_reach_neither_training_nor_torch():
    graph = build()
    problems = forbidden_reaches(graph, ("servable", "serving"), ("training",), ("torch",))
    assert not problems, "servable/ and serving/ must not import training or torch:\n" + "\n".join(problems)


def test_core_does_not_reach_serving():
    graph = build()
    problems = forbidden_reaches(graph, ("servable",), ("serving",), ())
    assert not problems, "servable/ must not import serving:\n" + "\n".join(problems)


def test_serving_builds_no_class_with_type_at_import():
    found = classes_built_with_type(build(), "serving")
    assert not found, "write a class statement instead of type(name, bases, namespace):\n" + "\n".join(found)
