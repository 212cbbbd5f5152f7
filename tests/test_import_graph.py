"""Every module of ``linvision`` imports, and no modules of the package import each other in a cycle.

The graph is read from the source (``ast``: every ``import`` statement, at module level or inside a function,
so lazy imports count too). An edge goes from a module to each ``linvision`` module it names:
``from pkg import name`` names ``pkg.name`` when that is a module, else ``pkg``; a package's ``__init__``
is not counted as imported by its own submodules (Python initialises it first, whatever they import).
"""
import ast
import importlib
import pkgutil
from pathlib import Path
from typing import Dict, List, Set

import pytest

import linvision

ROOT = Path(linvision.__file__).resolve().parent


def _module_files() -> Dict[str, Path]:
    files = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


MODULES = _module_files()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <node.module> import ...`` inside ``module``."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> Dict[str, Set[str]]:
    """``module -> the linvision modules it imports`` for every module under ``linvision/``."""
    graph = {}
    for module, path in MODULES.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in MODULES)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in MODULES:
                        edges.add(sub)
                    elif target in MODULES:
                        edges.add(target)
        # A submodule's import of its own ancestor package is Python initialising that package first.
        graph[module] = {e for e in edges if e != module and not module.startswith(e + ".")}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]`` (iterative depth-first search)."""
    state: Dict[str, int] = {}          # 1 on the current path, 2 finished
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state and nxt in graph:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_graph_reads_relative_and_lazy_imports():
    graph = import_graph()
    assert "linvision.attn.ops.naive" in graph["linvision.attn.core"]          # from .ops.naive import ...
    assert "linvision.attn.ops.linear_attn" in graph["linvision.attn.ops"]     # lazy, inside __getattr__
    assert "linvision.attn.ops.autotune" in graph["linvision.attn.tuning"]     # from .ops import autotune, in tune()


def test_no_import_cycle_among_attn_modules():
    graph = import_graph()
    attn = {m: {e for e in edges if e.startswith("linvision.attn")}
            for m, edges in graph.items() if m.startswith("linvision.attn")}
    assert len(attn) > 10
    cycle = find_cycle(attn)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycle_in_the_package():
    """Layers import downwards only (attn → ops → backbones → adapters/training; serialization below
    checkpoint and pretrained), so no two modules import each other, lazily or not."""
    graph = import_graph()
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)
