"""No import cycles among the project's modules, imports inside functions included.

The graph is grimp's (the library import-linter is built on): a static scan of every
``import`` statement of the installed packages, module-level, nested and lazy alike. A
cycle fails the test, printed as the chain of imports with file lines. The layer rules
themselves are import-linter contracts (pyproject.toml, run by ``lint-imports`` in
.ci/run); this test runs in every pytest run.
"""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("drmerge", "service", "worker", "drmerge_client", "drmerge_ops")

# Cycles that are known and being removed by a named piece of work. Each entry must
# still exist (the test fails once it is gone, so the entry is deleted with the fix).
KNOWN_CYCLES: list[frozenset[str]] = []


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def strongly_connected(graph) -> list[frozenset[str]]:
    """Tarjan's algorithm over the direct imports; components of more than one module
    (or a module that imports itself) are the cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        # Iterative depth-first search: (module, iterator over what it imports).
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            advanced = False
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1 or graph.direct_import_exists(importer=v, imported=v):
                    found.append(frozenset(component))
    return found


def describe(graph, component: frozenset[str]) -> str:
    lines = []
    for importer in sorted(component):
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & component):
            where = ", ".join(str(d["line_number"]) for d in graph.get_import_details(importer=importer,
                                                                                       imported=imported))
            lines.append(f"    {importer} -> {imported} (line {where})")
    return "cycle among " + ", ".join(sorted(component)) + ":\n" + "\n".join(lines)


def test_the_scan_sees_nested_imports(graph):
    # drmerge.storage opens S3 storage with an import inside open_storage: the graph must
    # hold that edge, or a lazy import could hide a cycle.
    assert graph.direct_import_exists(importer="drmerge.storage", imported="drmerge.s3")
    assert graph.direct_import_exists(importer="drmerge_ops.client_commands", imported="drmerge_client")


def test_cycle_finder_finds_a_cycle():
    g = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.c")
    g.add_import(importer="p.c", imported="p.a")
    g.add_import(importer="p", imported="p.a")
    assert strongly_connected(g) == [frozenset({"p.a", "p.b", "p.c"})]


def test_no_import_cycles(graph):
    cycles = strongly_connected(graph)
    unknown = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not unknown, "import cycles:\n" + "\n".join(describe(graph, c) for c in unknown)
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"these known cycles are gone: delete them from KNOWN_CYCLES: {gone}"
