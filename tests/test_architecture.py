"""The house rule: the engine never imports Qt, statically or at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO


def test_import_linter_contract_holds():
    lint = shutil.which("lint-imports")
    assert lint, "import-linter is a dev dependency; install with .[dev]"
    proc = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "KEPT" in proc.stdout


def test_importing_the_trainer_loads_no_qt():
    code = ("import sys, app.core.train.trainer, app.core.chat, app.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'shiboken6')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _import_loops() -> list[list[str]]:
    """Every set of app modules that import each other round a loop (strongly connected, by
    grimp's graph: imports inside functions count too)."""
    import grimp

    graph = grimp.build_graph("app", cache_dir=None)  # never a cached graph: the fake package below is "app" too
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d.startswith("app")}
             for m in graph.modules if m.startswith("app")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in edges[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            part = []
            while True:
                other = stack.pop()
                part.append(other)
                if other == module:
                    break
            if len(part) > 1:
                loops.append(sorted(part))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(edges):
        if module not in index:
            visit(module)
    return loops


def test_no_import_loops_in_app():
    assert _import_loops() == []


def test_the_loop_finder_finds_a_loop(tmp_path, monkeypatch):
    """The check above can fail: two modules that import each other are found."""
    package = tmp_path / "app"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "one.py").write_text("from app import two\n")
    (package / "two.py").write_text("def f():\n    from app import one\n")
    (package / "three.py").write_text("from app import one\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
        monkeypatch.delitem(sys.modules, name)
    assert _import_loops() == [["app.one", "app.two"]]


LONGEST_FUNCTION = 60
MOST_PARAMETERS = 8


def _functions(root):
    """(where, lines, parameters) of every function and method under `root` (self and cls not counted)."""
    import ast

    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args
                named = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
                count = len(named) + bool(arguments.vararg) + bool(arguments.kwarg)
                if named and named[0].arg in ("self", "cls"):
                    count -= 1
                where = f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"
                yield where, node.end_lineno - node.lineno + 1, count


def test_no_function_in_app_is_over_60_lines_or_takes_over_8_parameters():
    found = list(_functions(REPO / "app"))
    assert len(found) > 500  # the walk found the code
    assert [f"{where}: {lines} lines" for where, lines, _ in found if lines > LONGEST_FUNCTION] == []
    assert [f"{where}: {count} parameters" for where, _, count in found if count > MOST_PARAMETERS] == []


def test_the_function_check_sees_a_long_function_and_many_parameters(tmp_path):
    (tmp_path / "app").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(LONGEST_FUNCTION))
    (tmp_path / "app" / "bad.py").write_text(f"def long():\n{body}\n\n\ndef wide(a, b, c, d, e, f, g, h, *i):\n"
                                             "    pass\n\n\nclass C:\n    def fine(self, a, b, c, d, e, f, g, h):\n"
                                             "        pass\n")
    found = {where.split()[-1]: (lines, count) for where, lines, count in _functions(tmp_path / "app")}
    assert found == {"long": (LONGEST_FUNCTION + 1, 0), "wide": (2, 9), "fine": (2, 8)}
