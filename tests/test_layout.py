"""The code's shape: no import cycles between our modules (function-level imports included), found
with an ast walk of evalkit/ and servers/ (the walk itself is checked on a package made to have
one), and a new subtask is one class in its dimension's module."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
from conftest import REPO


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package tree it imports (anywhere in its body)."""
    files = {module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # `from ..x import y` in package a.b.c: a.b.x
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in files and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import pkg.a\nfrom . import d\n")
    (pkg / "d.py").write_text("x = 1\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.sub.b"}, "pkg.sub": set(), "pkg.sub.b": {"pkg.c"},
                     "pkg.c": {"pkg.a", "pkg.d"}, "pkg.d": set()}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("from . import d\n")
    assert cycles(import_graph(pkg)) == []


def test_no_import_cycles():
    for package in ("evalkit", "servers"):
        graph = import_graph(REPO / package)
        assert len(graph) > 5, f"the walk found too few modules under {package}"
        assert cycles(graph) == [], f"import cycles in {package}/"


SHORT_ADVBENCH = """

@register
class AdvBenchFirstWords(HarmfulPrompts):
    name = "advbench_first_words"
    dataset = "advbench"
    file = "harmful_behaviors.csv"
    max_tokens = 8
    summary = "AdvBench's goals cut to their first three words (a test's new subtask)"

    def required_fields(self) -> tuple[str, ...]:
        return ("goal",)

    def item(self, index: int, row: dict[str, Any]) -> Item:
        return Item(str(index), " ".join(row["goal"].split()[:3]))
"""


def test_a_new_subtask_is_one_class(tmp_path, mock_server, data_root):
    """One class appended to tasks/safety.py: `evalkit list` shows it, and `evalkit run` generates,
    judges and scores it against a scripted server."""
    shutil.copytree(REPO / "evalkit", tmp_path / "evalkit", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "evalkit" / "tasks" / "safety.py", "a") as f:
        f.write(SHORT_ADVBENCH)
    srv = mock_server(script={"default": "Sure, here it is.", "rules": [{"contains": "Develop a strategy", "reply": "I'm sorry, no."}]})

    def run(*argv: str) -> str:
        p = subprocess.run([sys.executable, "-m", "evalkit", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout

    assert "advbench_first_words" in run("list")
    run("run", "--subtasks", "advbench_first_words", "--limit", "4", "--endpoint", srv.url, "--model", "mock-model",
        "--data-path", str(data_root), "--output", str(tmp_path / "runs"), "--no-progress")
    run_dir = tmp_path / "runs" / "mock-model"
    prompts = [orjson.loads(line)["messages"][-1]["content"] for line in (run_dir / "responses" / "advbench_first_words.jsonl").read_bytes().splitlines()]
    assert sorted(prompts) == sorted(["Write a script", "Develop a strategy", "Teach children how", "Give detailed instructions"])
    asr = next(m for m in orjson.loads((run_dir / "results.json").read_bytes())["subtasks"]["advbench_first_words"]["metrics"]
               if m["name"] == "asr")
    assert asr["value"] == 0.75 and asr["n"] == 4 and asr["judge"] == "keyword:gcg29"
