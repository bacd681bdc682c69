"""The codebase's own rules (docs/architecture.md), checked on the source: no import cycle between
memlens modules (function-level imports counted), no function longer than a screen, function-level
imports only where they keep a heavy dependency out of a light command, and layers that import
downwards only."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "memlens"
# What a light command (gate, report, card, policy) must not pay for at import.
HEAVY = {"torch", "torchvision", "timm", "opacus", "weasyprint", "datasets", "pyarrow", "sklearn"}
MAX_LINES = 80
# Top to bottom; a module may import its own layer and the layers below (README, "Architecture").
LAYERS = [
    {"memlens.cli", "memlens.__main__"},
    {"memlens.pipeline"},
    {"memlens.reports"},
    {"memlens.policy"},
    {"memlens.audit"},
    {"memlens.dp"},
    {"memlens.train"},
    {"memlens.data"},
    {"memlens.models", "memlens.config", "memlens.io", "memlens.integrity", "memlens.rng", "memlens.device",
     "memlens.distributed", "memlens.errors", "memlens.resources", "memlens.progress", "memlens.version", "memlens"},
]


class Imp:
    def __init__(self, module: str, node: ast.stmt, target: str, external: str | None, in_function: bool):
        self.module, self.node, self.target, self.external, self.in_function = (module, node, target, external,
                                                                                 in_function)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    while name not in MODULES:
        name = name.rsplit(".", 1)[0]
    return name


def _probes(tree: ast.AST) -> set[ast.stmt]:
    """Imports inside ``try: ... except ImportError``: feature probes of a dependency's version."""
    out = set()
    for node in ast.walk(tree):
        guarded = isinstance(node, ast.Try) and any("ImportError" in ast.unparse(h.type) for h in node.handlers
                                                    if h.type is not None)
        if guarded:
            out |= {s for s in node.body if isinstance(s, (ast.Import, ast.ImportFrom))}
    return out


def _imports(module: str, path: Path) -> list[Imp]:
    """Every import statement of a module: its memlens target module (or the third-party package)."""
    out: list[Imp] = []
    tree = ast.parse(path.read_text())
    probes = _probes(tree)

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if child in probes and "memlens" not in ast.unparse(child):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "memlens":
                        out.append(Imp(module, child, _resolve(alias.name), None, inner))
                    else:
                        out.append(Imp(module, child, "", alias.name.split(".")[0], inner))
            elif isinstance(child, ast.ImportFrom):
                assert not child.level, f"{module}: relative import (memlens uses absolute imports)"
                if child.module.split(".")[0] == "memlens":
                    for alias in child.names:
                        sub = f"{child.module}.{alias.name}"
                        out.append(Imp(module, child, sub if sub in MODULES else _resolve(child.module), None, inner))
                else:
                    out.append(Imp(module, child, "", child.module.split(".")[0], inner))
            visit(child, inner)

    visit(tree, False)
    return out


IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def _top_level_dependencies(module: str) -> set[str]:
    """The third-party packages importing ``module`` loads (its module-level imports, transitively)."""
    seen, stack, found = set(), [module], set()
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        for imp in IMPORTS[m]:
            if imp.in_function:
                continue
            if imp.external:
                found.add(imp.external)
            else:
                stack.append(imp.target)
    return found


def _heavy(module: str) -> bool:
    return bool(_top_level_dependencies(module) & HEAVY)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles_counting_function_level_imports():
    graph = defaultdict(set)
    for m, imps in IMPORTS.items():
        graph[m] |= {i.target for i in imps if not i.external and i.target != m}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    # the check itself, on a known cycle and a known acyclic graph
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_function_longer_than_a_screen():
    long = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert long == []


def _comment_above(path: Path, node: ast.stmt, lines: list[str]) -> bool:
    """A comment on the import's line, or on the lines directly above it (over the imports before it)."""
    if "#" in lines[node.lineno - 1]:
        return True
    k = node.lineno - 2
    while k >= 0 and lines[k].strip().startswith(("from ", "import ")):
        k -= 1
    return k >= 0 and lines[k].strip().startswith("#")


def test_function_level_imports_keep_a_heavy_dependency_out_of_a_light_module():
    bad = []
    for m, imps in IMPORTS.items():
        lines = MODULES[m].read_text().splitlines()
        for imp in imps:
            if not imp.in_function:
                continue
            where = f"{m}:{imp.node.lineno}"
            if imp.external in sys.stdlib_module_names:
                bad.append(f"{where}: standard library {imp.external} imported in a function")
            elif imp.external and imp.external in _top_level_dependencies(m):
                bad.append(f"{where}: {imp.external} is loaded with {m} already")
            elif not imp.external and (_heavy(m) or not _heavy(imp.target)):
                bad.append(f"{where}: {imp.target} imported in a function of {'a heavy' if _heavy(m) else 'a'} "
                           f"module ({imp.target} is {'heavy' if _heavy(imp.target) else 'light'})")
            elif not _comment_above(MODULES[m], imp.node, lines):
                bad.append(f"{where}: a function-level import without a comment saying why")
    assert bad == []


def test_light_commands_stay_light():
    # gate, report, card and the CLI itself read audits without torch, timm or the encoders
    for m in ("memlens.cli", "memlens.policy.gate", "memlens.reports.render", "memlens.reports.card",
              "memlens.audit.results"):
        assert not _heavy(m), f"{m} imports {sorted(_top_level_dependencies(m) & HEAVY)} at module level"


def test_no_imports_through_a_lazy_package():
    # a package whose names load on first use (PEP 562) hides what a module really imports
    lazy = {m for m, p in MODULES.items() if p.name == "__init__.py" and "def __getattr__" in p.read_text()}
    bad = [f"{m}:{i.node.lineno} imports a name from {i.target}" for m, imps in IMPORTS.items() for i in imps
           if i.target in lazy and isinstance(i.node, ast.ImportFrom) and i.node.module == i.target]
    assert bad == []


def _layer(module: str) -> int:
    for k, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names if n != "memlens") or module in names:
            return k
    raise AssertionError(f"{module} is in no layer of the architecture")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_import_downwards(module):
    up = sorted({i.target for i in IMPORTS[module] if not i.external and _layer(i.target) < _layer(module)})
    assert up == [], f"{module} (layer {_layer(module)}) imports higher layers: {up}"
