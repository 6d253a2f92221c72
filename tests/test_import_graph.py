"""The package's import graph has no cycle.

Every module under ``lmserve/`` is parsed with ``ast`` (nothing is imported). Its edges are every
import it can run: at module level and inside functions and classes; relative forms resolved
(``from . import x``, ``from ..engine import y``); ``from pkg import name`` where ``pkg.name`` is a
module counts as importing that submodule, otherwise as importing ``pkg``; ``import a.b.c`` counts as
importing ``a.b.c``. Imports under ``if TYPE_CHECKING:`` are left out (they never run). A package is
its ``__init__.py``: the imports there are the package's edges. Only edges between ``lmserve``
modules are kept. A cycle is a strongly connected component of more than one module.

``KNOWN_CYCLES_TO_REMOVE`` may only shrink: the test fails on any cycle not in it, and on any
entry that is no longer a cycle.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lmserve"

# Cycles that exist today and are being removed; nothing may be added here. The model-layer
# redesign (issue 25) removes them: a compute backend must not import the layers that call it.
# Remove an entry when its cycle is gone (the test fails until you do).
KNOWN_CYCLES_TO_REMOVE: set[frozenset[str]] = set()


# ----------------------------------------------------------------------------- the walker
def module_files(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` under ``root/package`` (``pkg/__init__.py`` is
    ``pkg``)."""
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root / package):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = Path(dirpath) / fn
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree`` except those in the body of ``if TYPE_CHECKING:``
    (its ``else:`` branch runs, so it is kept)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _base_package(module: str, is_package: bool, level: int) -> str:
    """The package a relative import of ``level`` dots is resolved against."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(parts):
        raise ValueError(f"relative import beyond the top level in {module}")
    return ".".join(parts[: len(parts) - (level - 1)])


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` if it is a module, else its longest prefix that is one, else None."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules it imports}`` for ``root/package``, restricted to that package."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for node in _runtime_imports(tree):
            if isinstance(node, ast.Import):
                targets.update(filter(None, (_known(a.name, modules) for a in node.names)))
                continue
            base = node.module or ""
            if node.level:
                pkg = _base_package(name, is_package, node.level)
                base = f"{pkg}.{base}" if base and pkg else (base or pkg)
            if not (base == package or base.startswith(package + ".")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else _known(base, modules)
                if target:
                    targets.add(target)
        targets.discard(name)
        graph[name] = targets
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Tarjan's algorithm (iterative): the components of more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.add(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


def describe(cycle: frozenset[str], graph: dict[str, set[str]]) -> str:
    """The component's modules and its edges, e.g. ``a -> b, b -> a``."""
    edges = [f"{a} -> {b}" for a in sorted(cycle) for b in sorted(graph[a] & cycle)]
    return f"{{{', '.join(sorted(cycle))}}} via {', '.join(edges)}"


# ----------------------------------------------------------------------------- lmserve itself
def test_lmserve_has_no_import_cycle():
    assert all(m.startswith("lmserve.model.") for c in KNOWN_CYCLES_TO_REMOVE for m in c), \
        "only the model layers' cycles may be listed in KNOWN_CYCLES_TO_REMOVE"
    graph = import_graph(ROOT, PACKAGE)
    assert "lmserve.engine.scheduler" in graph and "lmserve.worker.model_runner" in graph
    cycles = set(strongly_connected(graph))
    new = cycles - KNOWN_CYCLES_TO_REMOVE
    gone = KNOWN_CYCLES_TO_REMOVE - cycles
    assert not new, "import cycles in lmserve:\n" + "\n".join(describe(c, graph) for c in new)
    assert not gone, ("these cycles in KNOWN_CYCLES_TO_REMOVE no longer exist (or changed): remove them "
                      "from the list:\n" + "\n".join(sorted(str(sorted(c)) for c in gone)))


def test_worker_does_not_import_the_scheduler():
    graph = import_graph(ROOT, PACKAGE)
    assert "lmserve.engine.scheduler" not in graph["lmserve.worker.model_runner"]
    assert "lmserve.engine.sched_output" in graph["lmserve.worker.model_runner"]
    assert graph["lmserve.engine.sched_output"] == set()


# ----------------------------------------------------------------------------- the walker itself
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_walker_finds_a_cycle_and_skips_type_checking(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.c import C\n",
        "pkg/a.py": "from . import b\n",                                  # relative: pkg.b
        "pkg/b.py": "def f():\n    from pkg.sub import d\n",              # in a function: pkg.sub.d
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                    "else:\n    import os\nC = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from ..a import x\nimport json\n",               # two dots: pkg.a
        "pkg/e.py": "import typing\nif typing.TYPE_CHECKING:\n    import pkg.a\nimport pkg\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": {"pkg.c"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.d"}, "pkg.c": set(),
        "pkg.sub": set(), "pkg.sub.d": {"pkg.a"}, "pkg.e": {"pkg"},
    }
    assert strongly_connected(graph) == [frozenset({"pkg.a", "pkg.b", "pkg.sub.d"})]
    assert "pkg.a -> pkg.b" in describe(strongly_connected(graph)[0], graph)


def test_walker_type_checking_import_makes_no_cycle(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/x.py": "from pkg import y\n",
        "pkg/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.x import X\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.y"] == set() and strongly_connected(graph) == []
    # the same import at run time is a cycle, and so is one through a package's __init__
    (tmp_path / "pkg/y.py").write_text("from pkg.x import X\n")
    assert strongly_connected(import_graph(tmp_path, "pkg")) == [frozenset({"pkg.x", "pkg.y"})]
    _write(tmp_path, {"pkg/y.py": "", "pkg/__init__.py": "from .x import X\n", "pkg/z.py": "import pkg\n",
                      "pkg/x.py": "from pkg.z import Z\n"})
    assert strongly_connected(import_graph(tmp_path, "pkg")) == [frozenset({"pkg", "pkg.x", "pkg.z"})]
