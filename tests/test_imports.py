"""No import cycles: between files, between sub-packages, between the top-level packages.

Read statically from the sources (every ``import``, also the ones inside functions, which are
cycles all the same; ``if TYPE_CHECKING:`` blocks are for annotations only and not counted).
The packages are layered ``spectral`` < ``cluster`` < ``analysis`` < ``jobs``: each imports only
from those before it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spectral", "cluster", "analysis", "jobs")
LAYERS = {name: i for i, name in enumerate(PACKAGES)}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node):
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    # an import of a.b.c imports a.b.c (and runs the __init__ of a.b, counted as its own file)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, name, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    import sys

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            strong(v)
    return out


def _group(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


def collapsed(edges: dict[str, set[str]], depth: int) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for v, ws in edges.items():
        g = _group(v, depth)
        out.setdefault(g, set()).update(_group(w, depth) for w in ws if _group(w, depth) != g)
    return out


def test_the_reader_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import jobs.sweep\n"
                   "def f():\n    from jobs import registry\n")
    assert imports_of(src, "spectral.m", {"jobs.sweep": src, "jobs.registry": src, "jobs": src}) == {
        "jobs", "jobs.registry"}


def test_no_cycle_between_files():
    assert cycles(graph()) == []


def test_no_cycle_between_sub_packages():
    assert cycles(collapsed(graph(), 2)) == []


def test_packages_are_layered():
    edges = collapsed(graph(), 1)
    upward = sorted((v, w) for v, ws in edges.items() for w in ws if LAYERS[w] > LAYERS[v])
    assert upward == [], f"imports against the layering {' < '.join(PACKAGES)}: {upward}"


def test_statistics_do_not_import_their_rendering():
    """analysis/ computes, analysis/render/ draws and writes text: never the other way."""
    edges = graph()
    wrong = sorted((v, w) for v, ws in edges.items() if v.startswith("analysis.") and not v.startswith("analysis.render")
                   for w in ws if w.startswith("analysis.render"))
    assert wrong == []
