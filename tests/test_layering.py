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
