"""The package's shape: every module imports; each module sits in a layer of the table in docs/architecture.md and
imports only from its own layer or the layers below (lazy imports inside functions count too); no import cycles;
no module grows past ~420 lines without saying why at its top."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import cascaded_diffusion

PACKAGE = Path(cascaded_diffusion.__file__).parent
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
MAX_LINES = 420
EXEMPT: set[str] = set()


def _modules() -> dict[str, Path]:
    modules = {"cascaded_diffusion": PACKAGE / "__init__.py"}
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


def layer_table() -> dict[str, int]:
    """docs/architecture.md's module map: ``cascaded_diffusion.x`` (a module) or ``cascaded_diffusion.pkg.``
    (every module of a package not listed on its own) -> its layer."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("## Module map"):]
    section = section[: section.index("\n## ", 1)]
    table: dict[str, int] = {}
    layer = None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 3 or not cells[1].startswith("`"):
            continue
        if cells[0]:
            layer = int(re.match(r"\d+", cells[0]).group())
        path = re.match(r"`([^`]+)`", cells[1]).group(1)
        if path.endswith("/"):
            key = "cascaded_diffusion." + path.rstrip("/").replace("/", ".") + "."
        else:
            parts = path[: -len(".py")].split("/")
            if parts[-1] == "__init__":
                parts = parts[:-1]
            key = ".".join(["cascaded_diffusion", *parts])
        assert key not in table, f"{path} is in the module map twice"
        table[key] = layer
    return table


def layer_of(module: str, table: dict[str, int]) -> int | None:
    if module in table:
        return table[module]
    packages = [key for key in table if key.endswith(".") and (module + ".").startswith(key)]
    return table[max(packages, key=len)] if packages else None


def test_every_module_imports():
    for name in _modules():
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


def test_every_module_is_in_the_layer_table_and_every_row_is_a_module():
    table, modules = layer_table(), _modules()
    missing = sorted(m for m in modules if layer_of(m, table) is None)
    assert not missing, f"modules missing from the module map of docs/architecture.md: {missing}"
    stale = sorted(k for k in table if k not in modules and not any(m.startswith(k) for m in modules))
    assert not stale, f"rows of the module map that name no module: {stale}"


def test_imports_go_down_the_layers():
    table = layer_table()
    upward = [f"{name} (layer {layer_of(name, table)}) imports {dep} (layer {layer_of(dep, table)})"
              for name, deps in sorted(import_graph().items()) for dep in sorted(deps)
              if layer_of(dep, table) > layer_of(name, table)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


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
