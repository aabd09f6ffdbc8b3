"""The package's shape (issue 17): no import circles between modules, and the stages' ownership rules.

Read statically (ast), so a circle hidden inside a function-level import counts too: such an import
works today only because of the order in which modules happen to be loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "galaxalign_batch"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at top level or inside functions).

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
    """
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        package = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # ``if TYPE_CHECKING:`` imports never run
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[m].update(t for t in targets if t in mods and t != m)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_the_circle_finder_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph()
    assert "galaxalign_batch.ops.loss" in graph["galaxalign_batch.ops"]  # the reader sees the package's imports
    circles = strongly_connected(graph)
    detail = "; ".join(" <-> ".join(c) for c in circles)
    assert not circles, f"import circles between modules: {detail}"


def test_only_the_store_touches_its_zarr_group():
    """The store owns its arrays (issue 17's acceptance: ``grep -rn "\\.group\\b" galaxalign_batch``
    outside store/ finds nothing), and nothing outside store/ imports zarr."""
    import re

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "store":
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.group\b", line) or re.match(r"\s*(import zarr|from zarr\b)", line):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{no}: {line.strip()}")
    assert not found, "outside store/:\n" + "\n".join(found)


def test_errors_about_values_are_value_errors():
    from galaxalign_batch.errors import ConfigError, GalaxAlignError, TileError

    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, GalaxAlignError)
    e = TileError("a.fits", "truncated\nfile")
    assert isinstance(e, ValueError) and str(e) == "a.fits: truncated file"


# Renames that are their owner's own commit protocol: a training checkpoint, the store's groups and derived
# arrays (folders renamed into place), and a stale lease renamed aside before it is broken (lease.py).
FOLDER_RENAMES = {"model/checkpoint.py", "store/embedding_store.py", "store/derived.py", "lease.py"}


def test_files_are_replaced_through_one_helper():
    """Every output file is written through ``galaxalign_batch.atomic`` (a temporary name unique to the
    writer, removed on an error), not a hand-made ``tmp`` + ``os.replace``: fixed temporary names let two
    writers of one file publish a half-written one."""
    import re

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "atomic.py" or rel in FOLDER_RENAMES:
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bos\.(replace|rename)\(|\.partial\b[\"']", line):
                found.append(f"{rel}:{no}: {line.strip()}")
    assert not found, "write these through galaxalign_batch.atomic:\n" + "\n".join(found)
