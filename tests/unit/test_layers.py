"""The package's shape: imports run one way (docs/architecture.md).

Read from the source with ``ast``, so the test sees every import, also the
ones inside functions, and fails on a cycle before it could bite at import
time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "eventbroker"

# Each layer may import the layers before it (and itself), nothing after it.
LAYERS = [
    {"errors", "_fastpath", "protocol"},
    {"config"},
    {"kafka", "security", "schema", "privacy"},
    {"gateway"},
    {"spool"},
    {"ops"},
    {"cli"},
]
# The SDK runs in producers' services: the wire protocol and nothing of the server.
CLIENT_MAY_IMPORT = {"errors", "_fastpath", "protocol", "client"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(path: Path, name: str) -> list[tuple[str, bool]]:
    """(imported eventbroker module, inside a function) for each import."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, in_function) for a in child.names if a.name.startswith("eventbroker"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - child.level + 1] + ([base] if base else []))
                if base.startswith("eventbroker"):
                    for a in child.names:
                        full = f"{base}.{a.name}"
                        out.append((full if full in _MODULES else base, in_function))
            visit(child, nested)

    visit(tree, False)
    return out


_MODULES = _modules()
_GRAPH = {name: _imports(path, name) for name, path in _MODULES.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(pkg: str) -> int:
    for i, layer in enumerate(LAYERS):
        if pkg in layer:
            return i
    raise AssertionError(f"package eventbroker.{pkg} is in no layer of this test: add it")


def test_top_level_holds_at_most_five_modules():
    top = sorted(p.name for p in SRC.iterdir() if p.suffix in (".py", ".pyx"))
    assert len(top) <= 5, top


def test_no_import_inside_a_function():
    inside = [(m, dep) for m, deps in _GRAPH.items() for dep, in_fn in deps if in_fn]
    assert not inside, f"eventbroker imports inside functions: {inside}"


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep, _ in _GRAPH.get(m, ()):
            if dep not in _GRAPH or dep == m:
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep)
        stack.pop()
        state[m] = 2

    for m in _GRAPH:
        if m not in state:
            walk(m)


def test_layers_import_downwards_only():
    wrong = []
    for m, deps in _GRAPH.items():
        pkg = _package(m)
        if not pkg:
            continue
        for dep, _ in deps:
            dpkg = _package(dep)
            if not dpkg or dpkg == pkg:
                continue
            if pkg == "client":
                if dpkg not in CLIENT_MAY_IMPORT:
                    wrong.append(f"{m} -> {dep} (the SDK imports server-side code)")
                continue
            if dpkg == "client":
                if pkg != "cli":
                    wrong.append(f"{m} -> {dep} (only the command line uses the SDK)")
                continue
            if _rank(dpkg) > _rank(pkg) or (_rank(dpkg) == _rank(pkg) and _rank(pkg) > 0):
                wrong.append(f"{m} -> {dep}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)
