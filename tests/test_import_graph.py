"""The import graph of ``tpm``, ``policies`` and ``rewards``, read statically with ``ast``.

Every import counts, at module level and inside functions: a function-level import only delays a
dependency, it does not remove it. An edge goes to the module named (``from a.b import c`` goes
to ``a.b.c`` when that is a module, else to ``a.b``); parent packages are not edges of their own,
as in the usual import-graph tools. Two rules:

1. no cycles;
2. ``tpm`` does not import ``policies``, ``rewards`` or the application layer ``tpm.app`` (which
   imports them: they build on ``tpm``), except for the entries listed in :data:`ENTRIES`.

``tests/test_layers.py`` checks the same boundaries at run time, in fresh interpreters.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tpm", "policies", "rewards")
APP = "tpm.app"
# Modules of tpm outside tpm.app that may import it, and why.
ENTRIES = {
    "tpm": "tpm.compare, the Python twin of tpm compare, imports tpm.app.cli on first call",
    "tpm.__main__": "python -m tpm runs the command line",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (None for third-party names)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in known:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            for t in targets:
                dep = _resolve(t, known)
                if dep is not None and dep != mod:
                    graph[mod].add(dep)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    graph = import_graph()
    assert "tpm.sampler" in graph["tpm"] and "tpm.policy" in graph["tpm.sampler"]
    assert "tpm.policy" in graph["policies.spatial"]
    assert "policies" in graph["tpm.app.cli"]  # a function-level import counts


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    described = ["; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def _in_app(mod: str) -> bool:
    return mod == APP or mod.startswith(APP + ".")


def test_only_the_app_layer_imports_policies_and_rewards():
    graph = import_graph()
    offenders = {
        mod: sorted(d for d in deps if d.split(".")[0] in ("policies", "rewards") or _in_app(d))
        for mod, deps in graph.items()
        if mod.split(".")[0] == "tpm" and not _in_app(mod) and mod not in ENTRIES
    }
    offenders = {m: d for m, d in offenders.items() if d}
    assert not offenders, f"tpm modules outside {APP} importing policies / rewards / {APP}: {offenders}"


def test_the_plugins_do_not_import_the_app_layer():
    graph = import_graph()
    offenders = {mod: sorted(d for d in deps if _in_app(d)) for mod, deps in graph.items()
                 if mod.split(".")[0] in ("policies", "rewards")}
    offenders = {m: d for m, d in offenders.items() if d}
    assert not offenders, f"policies / rewards importing {APP}: {offenders}"


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
