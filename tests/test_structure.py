"""The package's layering: no import cycle (imports inside functions included), layers import only downwards in
the layer table of docs/architecture.md, no test hooks read from the environment, and the `python -m` entry
points."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable
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


ARCHITECTURE = REPO / "docs" / "architecture.md"


def _expand(token: str) -> list[str]:
    """`runtime/{a,b}.py` -> [`runtime/a.py`, `runtime/b.py`]; other tokens as they are."""
    m = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", token)
    return [f"{m.group(1)}{part}{m.group(3)}" for part in m.group(2).split(",")] if m else [token]


def _layers() -> list[tuple[str, list[str]]]:
    """(layer, [path or folder/ under ppll_ext]) of each row of the layer table in docs/architecture.md, lowest
    first; the modules are the backquoted names of the second column, parenthesised notes left out."""
    rows = []
    for line in ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or cells[0] in ("layer", "---"):
            continue
        listed = re.sub(r"\([^)]*\)", "", cells[1])
        rows.append((cells[0], [p for token in re.findall(r"`([^`]+)`", listed) for p in _expand(token)]))
    return rows


def _module_of(path: str) -> str:
    """`core/block.py` -> ppll_ext.core.block, `train/__init__.py` -> ppll_ext.train, `core/` -> ppll_ext.core."""
    parts = ["ppll_ext", *path.rstrip("/").removesuffix(".py").split("/")]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer_of(modules: Iterable[str], rows: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Each module's row: the row naming its file, else the row naming the closest folder holding it."""
    files = {_module_of(p): i for i, (_, paths) in enumerate(rows) for p in paths if not p.endswith("/")}
    folders = {_module_of(p): i for i, (_, paths) in enumerate(rows) for p in paths if p.endswith("/")}
    out = {}
    for name in modules:
        if name in files:
            out[name] = files[name]
            continue
        prefix = name
        while prefix and prefix not in folders:
            prefix = prefix.rpartition(".")[0]
        if prefix:
            out[name] = folders[prefix]
    return out


def test_the_layer_table_parser() -> None:
    assert _expand("runtime/{sequential,threads}.py") == ["runtime/sequential.py", "runtime/threads.py"]
    rows = [("low", ["core/", "errors.py"]), ("high", ["train/__main__.py", "cli.py"]), ("mid", ["train/"])]
    assert _layer_of(["ppll_ext.core.block", "ppll_ext.errors", "ppll_ext.train.__main__", "ppll_ext.train",
                      "ppll_ext.train.run", "ppll_ext.other"], rows) == {
        "ppll_ext.core.block": 0, "ppll_ext.errors": 0, "ppll_ext.train.__main__": 1, "ppll_ext.train": 2,
        "ppll_ext.train.run": 2}


def test_layers_import_only_downwards() -> None:
    """Every module is in a row of the layer table of docs/architecture.md and imports only modules of its own row
    or of the rows above it (the table lists the lowest layer first)."""
    graph = _graph()
    rows = _layers()
    assert len(rows) >= 10, f"no layer table found in {ARCHITECTURE}"
    layer = _layer_of(graph, rows)
    unlisted = sorted(set(graph) - set(layer))
    assert unlisted == [], f"modules missing from the layer table of {ARCHITECTURE}: {unlisted}"
    upward = [f"{m} ({rows[layer[m]][0]}) imports {d} ({rows[layer[d]][0]})" for m, ds in sorted(graph.items())
              for d in sorted(ds) if layer[d] > layer[m]]
    assert upward == [], "imports upward in the layer table:\n" + "\n".join(upward)
    runtimes = {f"ppll_ext.runtime.{r}" for r in ("sequential", "threads", "processes")}
    for r in runtimes:
        assert graph[r] & runtimes == set(), f"{r} imports another runtime"
    for m, ds in graph.items():
        if m == "ppll_ext.pipelining" or m.startswith("ppll_ext.deepspeed"):
            assert ds & {"ppll_ext.runtime.processes", "ppll_ext.runtime.threads"} == set(), m


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
