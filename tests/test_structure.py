"""The import structure, read from the source (no module is imported): no cycles between our modules,
counting the imports inside functions (a cycle hidden there is still a cycle), and no package imports
one above it. The layers, lowest first:

    atop (the method)  <  tracking (the trial contract)  <  search_spaces  <  trainables  <  study  <  bench
    analysis: atop and tracking only (it reads MLflow; tests/test_study_contract.py checks it loads no torch)

`if TYPE_CHECKING:` imports count for cycles but not for layers (a type named in a hint, never loaded).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: package -> the packages of ours it may import at run time
ALLOWED = {
    "atop": set(),
    "tracking": {"atop"},
    "search_spaces": {"atop", "tracking"},
    "trainables": {"atop", "tracking"},
    "study": {"atop", "tracking", "search_spaces", "trainables"},
    "analysis": {"atop", "tracking"},
    "bench": {"atop", "tracking", "search_spaces", "trainables", "study", "analysis"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _type_checking_nodes(tree: ast.Module) -> set[ast.AST]:
    inside: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                inside.update(ast.walk(child))
    return inside


def imports(module: str, *, type_hints: bool) -> set[str]:
    """Our modules that `module` imports anywhere in its source (`type_hints`: with TYPE_CHECKING's)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skip = set() if type_hints else _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name in MODULES and name != module}


def test_the_source_is_read():
    assert {"atop.config", "study.run", "tracking.contract", "analysis.compute", "trainables.atop_trainable"} \
        <= MODULES.keys()
    assert "atop.config" in imports("study.settings", type_hints=False)


def test_no_import_cycles_even_through_imports_inside_functions():
    graph = {m: imports(m, type_hints=True) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_no_package_imports_a_package_above_it():
    upward = sorted(f"{m} imports {i}" for m in MODULES for i in imports(m, type_hints=False)
                    if i.split(".")[0] != m.split(".")[0] and i.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert not upward, upward
