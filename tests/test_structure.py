"""The layout promises of DESIGN.md: no import cycles between our modules (function-level imports count),
no module over the size a newcomer can read, and nothing builds a model through the training loop."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Our modules that ``path`` imports anywhere in its body; ``from pkg import sub`` counts as ``pkg.sub``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    me = module_name(path)
    return {m for m in found if m in known and m != me and not me.startswith(m + ".")}


def graph() -> dict[str, set[str]]:
    files = sorted((REPO / "vitpose").rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, known) for f in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other():
    assert cycles(graph()) == []


def test_the_cycle_check_sees_function_level_imports():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    here = graph()
    assert "vitpose.models" in here["vitpose.deploy.inference"]  # create, imported inside PosePredictor.from_uri


def test_modules_stay_readable():
    too_long = {str(p.relative_to(REPO)): n for p in sorted([*(REPO / "vitpose").rglob("*.py"),
                                                          *(REPO / "pipelines").glob("*.py")])
                if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert too_long == {}


def test_nothing_imports_the_training_loop_to_build_a_model():
    users = {m for m, deps in graph().items() if "vitpose.train.loop" in deps}
    assert users <= {"vitpose.train.worker", "vitpose.distill.trial"}


def test_benchmarks_are_a_package_of_short_scripts_that_edit_no_import_path():
    """benchmarks/ runs as ``python -m benchmarks.NAME`` against the installed package: no script edits sys.path
    or imports a sibling by bare name, and none is longer than a newcomer can read."""
    scripts = sorted((REPO / "benchmarks").rglob("*.py"))
    assert (REPO / "benchmarks" / "__init__.py").is_file() and scripts
    siblings = {p.stem for p in scripts}
    problems = []
    for path in scripts:
        text = path.read_text()
        name = str(path.relative_to(REPO))
        if len(text.splitlines()) > MAX_LINES:
            problems.append(f"{name}: {len(text.splitlines())} lines")
        if "sys.path" in text:
            problems.append(f"{name}: edits sys.path")
        for node in ast.walk(ast.parse(text)):
            bare = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            problems += [f"{name}: imports sibling {m!r} by bare name" for m in bare if m.split(".")[0] in siblings]
    assert problems == []


def test_code_comments_say_why_not_which_issue():
    """Issue numbers belong in commits and notes; a comment or docstring that cites one ages badly."""
    cited = [f"{p.relative_to(REPO)}:{n}" for p in sorted([*(REPO / "vitpose").rglob("*.py"),
                                                            *(REPO / "pipelines").glob("*.py")])
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\bissue \d+|\(issue\b|issue #\d+", line, re.IGNORECASE)]
    assert cited == []
