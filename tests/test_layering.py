"""The library stays orchestrator-free: no `sidrec` module imports ZenML, `steps` or `pipelines`, at import time or inside a function."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_sidrec_module_imports_zenml():
    modules = sorted(f"sidrec.{p.stem}" for p in (ROOT / "sidrec").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'zenml' or m.startswith(('zenml.', 'steps', 'pipelines')))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"sidrec imports orchestrator code: {out.stdout.strip()}"


def test_no_sidrec_source_imports_orchestrator_code_even_inside_functions():
    import ast

    bad = []
    for path in sorted((ROOT / "sidrec").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                    if n.split(".")[0] in ("zenml", "steps", "pipelines")]
    assert not bad, "sidrec/ must not import ZenML, steps or pipelines: " + "; ".join(bad)


def _import_graph() -> dict[str, set[str]]:
    """sidrec module -> the sidrec modules it imports, at module level or inside functions."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "sidrec").glob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            deps |= {n.split(".")[1] for n in names if n.startswith("sidrec.")}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_sidrec_modules_import_each_other_without_a_circle():
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]) if d in path else f"{m} -> {d}")
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles in sidrec/ (function-level imports count): " + "; ".join(cycles)


def test_leaf_modules_stay_leaves():
    """The modules everything else builds on import only the foundations below them."""
    graph = _import_graph()
    allowed = {"errors": set(), "config": {"errors"}, "runtime": {"config", "errors"}, "metrics": set(),
               "collab": set(), "index": set(), "parallel": {"errors", "artifacts"}, "kmeans": set(),
               "collisions": {"errors", "kmeans"}, "readers": {"config", "errors"}}
    bad = {m: sorted(graph[m] - ok) for m, ok in allowed.items() if graph[m] - ok}
    assert not bad, f"a foundation module imports upward: {bad}"
