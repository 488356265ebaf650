"""The package's folders show the architecture: the runtime's import graph has a direction and no cycle.

Every import counts, also those inside functions (a lazy import is still a dependency and still
a cycle waiting to bite). The rules (docs/architecture.md, "Where things live"):
- nothing under lynx_sglang/runtime/ or kernels/ imports a tool (a lynx_sglang module outside them);
- selection <- expert_parallel <- sglang: a layer imports only itself and the layers before it;
  kernels/ belong to the selection core; cpu/ imports no other part of lynx_sglang;
- no import cycle among runtime modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lynx_sglang"

# Which runtime parts each part may import (besides itself).
ALLOWED = {
    "selection": {"selection", "kernels"},
    "kernels": {"selection", "kernels"},
    "expert_parallel": {"selection", "kernels", "expert_parallel"},
    "sglang": {"selection", "kernels", "expert_parallel", "sglang", "cpu"},
    "cpu": {"cpu"},
}


def _module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "kernels"):
        rel = ("lynx_sglang", "kernels") + path.relative_to(ROOT / "kernels").with_suffix("").parts
    else:
        rel = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _runtime_files():
    files = sorted((PKG / "runtime").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    return {_module_name(p): p for p in files}


def _imports(path: Path, name: str, known: set) -> set:
    """lynx_sglang modules ``path`` imports (resolved to the deepest known module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            if not t.startswith("lynx_sglang"):
                continue
            while t not in known and "." in t:  # "pkg.module.Name" -> "pkg.module"
                t = t.rsplit(".", 1)[0]
            out.add(t)
    return out


def _part(module: str) -> str | None:
    """Which runtime part a module belongs to (None: not runtime)."""
    parts = module.split(".")
    if parts[:2] == ["lynx_sglang", "kernels"]:
        return "kernels"
    if parts[:2] == ["lynx_sglang", "runtime"] and len(parts) > 2:
        return parts[2]
    return None


def _graph():
    runtime = _runtime_files()
    tools = {_module_name(p) for p in PKG.rglob("*.py") if not p.is_relative_to(PKG / "runtime")}
    known = set(runtime) | tools | {"lynx_sglang", "lynx_sglang.runtime"}
    return runtime, {name: _imports(path, name, known) - {name} for name, path in runtime.items()}


def test_runtime_imports_no_tool_and_follows_the_layers():
    runtime, graph = _graph()
    assert len(runtime) > 15, "the runtime's modules were not found"
    bad = []
    for module, deps in graph.items():
        src = _part(module)
        for dep in deps:
            if dep == "lynx_sglang.runtime" or (dep.startswith("lynx_sglang.runtime.") and _part(dep) is None):
                continue  # the runtime's own package markers
            dst = _part(dep)
            if dst is None:
                bad.append(f"{module} imports {dep}, which is not part of the runtime (a tool or the public facade)")
            elif src is not None and dst not in ALLOWED[src]:
                bad.append(f"{module} ({src}) imports {dep} ({dst}), against the layer order")
    assert not bad, "\n".join(bad)


def _cycle(graph: dict) -> list | None:
    """One import cycle as a list of modules, or None (iterative DFS, white/grey/black)."""
    state = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next((d for d in it if d in graph), None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_runtime_has_no_import_cycle():
    _, graph = _graph()
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_planted_faults(tmp_path):
    """The checker itself: a planted cycle is found, a planted lazy tool import is reported."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None
    runtime, _ = _graph()
    known = set(runtime) | {"lynx_sglang.accuracy", "lynx_sglang"}
    planted = tmp_path / "_planted_for_test.py"  # read as if it sat in runtime/selection/
    name = "lynx_sglang.runtime.selection._planted_for_test"
    src = "def f():\n    from lynx_sglang.accuracy import main\n    from ..selection import reference\n"
    planted.write_text(src)
    deps = _imports(planted, name, known | {name, "lynx_sglang.runtime.selection.reference"})
    assert deps == {"lynx_sglang.accuracy", "lynx_sglang.runtime.selection.reference",
                    "lynx_sglang.runtime.selection"}


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_every_runtime_part_exists(part):
    """The layer table names real folders (a rename would otherwise make the rules vacuous)."""
    folder = ROOT / "kernels" if part == "kernels" else PKG / "runtime" / part
    assert any(folder.glob("*.py")), f"{folder} has no modules"
