"""The package's layering: no import cycle (imports inside functions included), layers import only downwards,
no test hooks read from the environment, and the `python -m` entry points."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ppll_ext"
REPO = PKG.parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every ppll_ext module `name` imports, anywhere in the file (functions and TYPE_CHECKING blocks too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_ppll_ext() -> None:
    graph = _graph()
    assert len(graph) > 30 and "ppll_ext.train.run" in graph
    assert _cycles(graph) == []


def test_layers_import_only_downwards() -> None:
    graph = _graph()

    def deps(prefix: str) -> set[str]:
        """What the modules of `prefix` import (its `python -m` entry module may call the CLI)."""
        return {d for m, ds in graph.items() if (m == prefix or m.startswith(prefix + "."))
                and not m.endswith(".__main__") for d in ds}

    def under(names: set[str], *prefixes: str) -> set[str]:
        return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}

    higher = ("ppll_ext.transport", "ppll_ext.runtime", "ppll_ext.train", "ppll_ext.deepspeed",
              "ppll_ext.pipelining", "ppll_ext.cli", "ppll_ext.checkpoint", "ppll_ext.build")
    assert under(deps("ppll_ext.core"), *higher) == set()
    assert under(deps("ppll_ext.transport"), "ppll_ext.runtime", "ppll_ext.train", "ppll_ext.deepspeed",
                 "ppll_ext.pipelining", "ppll_ext.cli") == set()
    assert under(deps("ppll_ext.runtime"), "ppll_ext.train", "ppll_ext.deepspeed", "ppll_ext.pipelining",
                 "ppll_ext.cli", "ppll_ext.checkpoint") == set()
    runtimes = {f"ppll_ext.runtime.{r}" for r in ("sequential", "threads", "processes")}
    for r in runtimes:
        assert graph[r] & runtimes == set(), f"{r} imports another runtime"
    assert under(deps("ppll_ext.train"), "ppll_ext.cli") == set()
    for integration in ("ppll_ext.deepspeed", "ppll_ext.pipelining"):
        assert under(deps(integration), "ppll_ext.train", "ppll_ext.cli", "ppll_ext.runtime.processes",
                     "ppll_ext.runtime.threads") == set()


def _root_name(node: ast.expr) -> str | None:
    """The name an attribute chain (a.b.c) starts from."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_changes_to_torch_live_in_torch_patches() -> None:
    """No module but ppll_ext/torch_patches.py assigns to an attribute of a torch module or calls setattr on one."""
    for path in PKG.rglob("*.py"):
        if path == PKG / "torch_patches.py":
            continue
        tree = ast.parse(path.read_text())
        torch_names = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                       for a in n.names if a.name.split(".")[0] == "torch"}
        torch_names |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                        and (n.module or "").split(".")[0] == "torch" for a in n.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                changed = [t for t in node.targets if isinstance(t, ast.Attribute)]
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(node.target, ast.Attribute):
                changed = [node.target]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
                changed = node.args[:1]
            else:
                continue
            for target in changed:
                assert _root_name(target) not in torch_names, (
                    f"{path}:{node.lineno} changes torch ({ast.unparse(target)}); only ppll_ext/torch_patches.py may")


def test_no_fault_injection_or_print_in_library_code() -> None:
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert "PPLL_FAULT" not in text and "SIGKILL" not in text, path
        if path.name not in ("cli.py", "loop.py", "run.py"):
            calls = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Name) and n.func.id == "print"]
            assert calls == [], f"{path} prints; library code logs (logging.getLogger(__name__))"


def test_python_m_entry_points() -> None:
    for module in ("ppll_ext", "ppll_ext.train"):
        res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "usage: ppll" in res.stdout


def test_tested_ranges_match_pyproject() -> None:
    """The adapters' tested version ranges are the ones pyproject.toml asks for, and the installed ones are in."""
    import deepspeed
    import torch

    from ppll_ext import pipelining
    from ppll_ext.deepspeed import _ds

    deps = (REPO / "pyproject.toml").read_text()

    def dotted(v: tuple[int, int]) -> str:
        return ".".join(map(str, v))

    assert f'"deepspeed>={dotted(_ds.TESTED[0])},<{dotted(_ds.TESTED[1])}"' in deps
    assert f'"torch>={dotted(pipelining.TESTED[0])}"' in deps
    for module, tested in ((deepspeed, _ds.TESTED), (torch, pipelining.TESTED)):
        version = tuple(int(p) for p in module.__version__.split("+")[0].split(".")[:2])
        assert tested[0] <= version < tested[1], (module.__name__, module.__version__)
