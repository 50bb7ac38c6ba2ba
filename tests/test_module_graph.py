"""The package's shape (issue 16): every module imports, no import cycles (lazy imports inside functions count
too), and no module grows past ~400 lines without saying why at its top."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import cascaded_diffusion

PACKAGE = Path(cascaded_diffusion.__file__).parent
MAX_LINES = 420
EXEMPT: set[str] = set()


def _modules() -> dict[str, Path]:
    modules = {}
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="cascaded_diffusion."):
        spec = importlib.util.find_spec(info.name)
        modules[info.name] = Path(spec.origin)
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from . import x` names a module; `from .m import f` names m
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    # a package's __init__ re-exporting from its own modules is not a dependency of those modules on it
    return {name: {m for m in deps if not (m == name.rpartition(".")[0] and m + "." in name + ".")}
            for name, deps in graph.items()}


def test_every_module_imports():
    for name in _modules():
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_long_modules_say_why():
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and name not in EXEMPT:
            head = "\n".join(lines[:40])
            assert "Longer than" in head, f"{name} has {len(lines)} lines and no 'Longer than ...' reason at its top"
