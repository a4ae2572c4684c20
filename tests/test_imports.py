"""The package's modules import each other in one direction only: no import circle inside hematovision/, counting
the imports inside functions too (a late import hides a circle from Python, not from the reader)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "hematovision"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, this: str, modules: set[str]) -> set[str]:
    """The `modules` that `path` (the module `this`) imports anywhere in its body: `import a.b`, `from a import b`,
    `from a.b import c`, relative imports too."""
    package = this.split(".") if path.name == "__init__.py" else this.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..a import x
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import hematovision.web.x` -> hematovision.web
                name = name.rpartition(".")[0]
            if name and name != this:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, module_name(path), modules) - {PACKAGE} for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every import below it is checked
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert {"hematovision.web", "hematovision.api", "hematovision.classifier"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_sees_late_imports_and_circles(tmp_path):
    """The checker itself: an import inside a function counts, and a circle of three is found."""
    (tmp_path / "a.py").write_text("def f():\n    from hematovision import b\n    from .c import d\n")
    modules = {"hematovision", "hematovision.a", "hematovision.b", "hematovision.c"}
    assert imported_modules(tmp_path / "a.py", "hematovision.a", modules) == {"hematovision", "hematovision.b",
                                                                            "hematovision.c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
