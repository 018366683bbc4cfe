"""The engine's import graph (module-level and nested imports, as grimp, import-linter's
graph library, reads them) has no cycles. (Method modules staying torch-free at import is
checked by importing them: tests/test_method_registry.py.)"""

from __future__ import annotations

import grimp

# Moved out of the engine or untangled by the service side of issue #12 (drmerge_ops,
# drmerge_client; drmerge.s3 <-> drmerge.storage): not this file's to judge until then.
SERVICE_SIDE = {"drmerge.cli_service", "drmerge.devstack", "drmerge.devservers", "drmerge.client",
                "drmerge.s3", "drmerge.storage"}


def cycles(graph, modules: set[str]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & modules) for m in modules}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles_in_the_engine():
    graph = grimp.build_graph("drmerge", cache_dir=None)
    found = [c for c in cycles(graph, set(graph.modules)) if not set(c) <= SERVICE_SIDE]
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)

