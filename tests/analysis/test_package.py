"""The analysis package's imports: every one at module top, and no module importing back into one that imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import loraplace.analysis

PACKAGE = Path(loraplace.analysis.__file__).parent


def _imports(path: Path) -> tuple[set[str], list[int]]:
    """(analysis modules ``path`` imports at its top, line numbers of imports anywhere else)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "loraplace.analysis":
                top |= {a.name for a in node.names}
            elif node.module.startswith("loraplace.analysis."):
                top.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            top |= {a.name.split(".")[2] for a in node.names if a.name.startswith("loraplace.analysis.")}
    nested = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
              and not any(n is t for t in tree.body)]
    return top, nested


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle of ``graph`` (module -> modules it imports) as a path, or None."""
    state: dict[str, str] = {}  # depth-first search: "open" while on the path, "done" after

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == "open":
                return path + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[name] = "done"
        return None

    return next((c for name in sorted(graph) if name not in state and (c := visit(name, [name]))), None)


def test_every_import_is_at_module_top_and_there_is_no_cycle():
    graph, nested = {}, {}
    for path in sorted(PACKAGE.glob("*.py")):
        graph[path.stem], lines = _imports(path)
        if lines:
            nested[path.stem] = lines
    assert nested == {}, f"imports inside functions or blocks (module: lines): {nested}"
    assert {"findings", "decision", "study", "racing", "from_store"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_check_sees_a_cycle_and_a_nested_import(tmp_path):
    """The same checks on modules made to break both rules find both."""
    (tmp_path / "a.py").write_text("from loraplace.analysis.b import x\n")
    (tmp_path / "b.py").write_text("from loraplace.analysis.a import y\n\ndef f():\n    import json\n")
    graph = {"a": _imports(tmp_path / "a.py")[0], "b": _imports(tmp_path / "b.py")[0]}
    assert graph == {"a": {"b"}, "b": {"a"}} and _imports(tmp_path / "b.py")[1] == [4]
    assert _cycle(graph) == ["a", "b", "a"] and _cycle({"a": {"b"}, "b": set()}) is None
