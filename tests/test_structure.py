"""The shape of the code, checked like its behaviour: no module in `gateway/` over
MAX_MODULE_LINES lines, no function over MAX_FUNCTION_LINES lines (read from the AST), and no
import cycle among `gateway` modules (grimp's import graph, the one import-linter's contracts
in pyproject.toml are checked against)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"
MAX_MODULE_LINES = 400  # a module a reader can hold in mind at once: one responsibility
MAX_FUNCTION_LINES = 60  # about a screen: a longer function is doing two things

def _modules() -> list[tuple[str, Path]]:
    return sorted(
        (p.relative_to(PACKAGE).as_posix(), p)
        for p in PACKAGE.rglob("*.py")
        if "__pycache__" not in p.parts
    )


def test_no_module_is_longer_than_the_limit() -> None:
    long = {
        relative: n
        for relative, path in _modules()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these by responsibility (lines): {long}"


def test_no_function_is_longer_than_the_limit() -> None:
    long: dict[str, int] = {}
    for relative, path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                n = (node.end_lineno or node.lineno) - first + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{relative}:{node.lineno} {node.name}"] = n
    assert not long, f"split these functions (lines): {long}"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_among_gateway_modules() -> None:
    # Imports under `if TYPE_CHECKING:` never run, so they cannot make a cycle at import time.
    graph = grimp.build_graph("gateway", exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above is only as good as `_cycles`: a known cycle must be reported."""
    graph = grimp.ImportGraph()
    for name in ("p.a", "p.b", "p.c"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.b", imported="p.c")
    assert _cycles(graph) == [["p.a", "p.b"]]


def test_every_exception_class_is_declared_in_errors() -> None:
    """One tree of exceptions (gateway/errors.py), each carrying its SMTP reply, HTTP
    status and retry-after: a class raised elsewhere would be mapped by nobody."""
    import importlib
    import pkgutil

    import gateway

    outside = []
    for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
        if info.name in ("gateway.__main__", "gateway.spare_main"):
            continue  # entry points: importing them runs them
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
                and info.name != "gateway.errors"
            ):
                outside.append(f"{info.name}.{name}")
    assert outside == []
