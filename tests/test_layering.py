"""The house: sidrec's subpackages import only downward, no module circle, no orchestrator code, and the
import paths that earlier versions saved (registered models, ZenML artifacts) still load."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIDREC = ROOT / "sidrec"

# the layers, bottom up (docs/architecture.md); a module may import its own package and anything below
LAYERS = [
    {"sidrec", "sidrec.errors", "sidrec.exports", "sidrec.config", "sidrec.runtime"},  # foundations
    {"sidrec.model"},
    {"sidrec.training"},
    {"sidrec.index"},
    {"sidrec.data"},
    {"sidrec.artifacts"},
    {"sidrec.evaluation"},
    {"sidrec.stages"},
    {"sidrec.ops", "sidrec.distributed"},
]
FOUNDATION_ORDER = ["sidrec", "sidrec.exports", "sidrec.errors", "sidrec.config", "sidrec.runtime"]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SIDREC.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.append((node.lineno, node.module or ""))
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The sidrec module an import names (the longest known prefix: `sidrec.index.quantize.X` -> module)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return name


def _unit(module: str) -> str:
    """The layer unit of a module: its subpackage (`sidrec.index`), or the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def _layer(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{unit} is in no layer: add it to tests/test_layering.py LAYERS and docs/architecture.md")


def _graph() -> dict[str, set[str]]:
    """sidrec module -> the sidrec modules it imports, at module level or inside functions."""
    modules = _modules()
    return {m: {_resolve(n, modules) for _, n in _imports(p) if n.startswith("sidrec.") or n == "sidrec"} - {m}
            for m, p in modules.items()}


def test_every_module_is_in_a_layer_and_imports_only_downward():
    bad = []
    for m, deps in _graph().items():
        um = _unit(m)
        for d in deps:
            ud = _unit(d)
            if ud == um:
                continue  # inside one subpackage (circles are checked below)
            lm, ld = _layer(um), _layer(ud)
            if ld > lm or (ld == lm == 0 and FOUNDATION_ORDER.index(ud) > FOUNDATION_ORDER.index(um)) \
                    or (ld == lm and lm > 0):
                bad.append(f"{m} -> {d}")
    assert not bad, "upward (or sideways) imports in sidrec/: " + "; ".join(sorted(bad))


def test_sidrec_modules_import_each_other_without_a_circle():
    graph = _graph()  # a package's __init__ re-exports lazily (sidrec.exports): it has no edges of its own
    state: dict[str, int] = {}
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


def test_library_code_uses_the_new_paths_only():
    from sidrec import MOVED

    old = {f"sidrec.{m}" for m in MOVED}
    bad = [f"{p.relative_to(ROOT)}:{ln} {n}" for p in sorted(SIDREC.rglob("*.py")) for ln, n in _imports(p)
           if _resolve(n, {o: None for o in old}) in old]
    assert not bad, "sidrec/ imports a pre-move module path (kept only for what earlier versions saved): " + "; ".join(bad)


def test_leaf_modules_stay_leaves():
    """The modules everything else builds on import only the foundations below them."""
    graph = _graph()
    allowed = {"sidrec.errors": set(), "sidrec.exports": set(), "sidrec.config": {"sidrec.errors"},
               "sidrec.runtime": {"sidrec.config", "sidrec.errors"}, "sidrec.evaluation.metrics": set(),
               "sidrec.index.collab": set(), "sidrec.index.sid_index": set(), "sidrec.training.parallel": {"sidrec.errors"},
               "sidrec.index.kmeans": set(), "sidrec.index.collisions": {"sidrec.errors", "sidrec.index.kmeans"},
               "sidrec.data.readers": {"sidrec.config", "sidrec.errors"}}
    bad = {m: sorted(graph[m] - ok) for m, ok in allowed.items() if graph[m] - ok}
    assert not bad, f"a foundation module imports upward: {bad}"


def test_no_sidrec_source_imports_orchestrator_code_even_inside_functions():
    bad = [f"{p.relative_to(ROOT)}:{ln} {n}" for p in sorted(SIDREC.rglob("*.py")) for ln, n in _imports(p)
           if n.split(".")[0] in ("zenml", "steps", "pipelines")]
    assert not bad, "sidrec/ must not import ZenML, steps or pipelines: " + "; ".join(bad)


def test_no_sidrec_module_imports_zenml():
    modules = sorted(_modules())
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'zenml' or m.startswith(('zenml.', 'steps', 'pipelines')))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"sidrec imports orchestrator code: {out.stdout.strip()}"


# what earlier versions saved names these: ZenML artifacts by data type, registered MLflow models by the
# imports of their serving.py (models from code: a copy of sidrec/serving.py as it was then)
PERSISTED = [
    ("sidrec.data", "Dataset"), ("sidrec.validation", "QualityReport"), ("sidrec.artifacts", "IndexBundle"),
    ("sidrec.artifacts", "InstructionSet"), ("sidrec.artifacts", "TrainedRecommender"), ("sidrec.artifacts", "EvalReport"),
    ("sidrec.artifacts", "EntityFeatures"),
    ("sidrec.serving", "SIDRecPyfunc"), ("sidrec.serving", "Recommender"), ("sidrec.model", "Encoder"),
    ("sidrec.model", "load_recommender"), ("sidrec.tasks", "PromptFormat"), ("sidrec.decode", "recommend"),
    ("sidrec.errors", "DataError"), ("sidrec.index", "SIDIndex"), ("sidrec.quantize", "QuantizerState"),
]


@pytest.mark.parametrize("module,name", PERSISTED)
def test_paths_saved_before_the_move_still_load(module, name):
    obj = getattr(importlib.import_module(module), name)
    assert obj.__module__.startswith("sidrec.")
    # the same object as under its new path: an isinstance check or a monkeypatch sees one thing
    assert getattr(importlib.import_module(obj.__module__), name) is obj


def test_old_module_names_are_the_new_module_objects():
    from sidrec import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(f"sidrec.{old}") is importlib.import_module(f"sidrec.{new}"), old


def test_zenml_resolves_the_data_types_of_artifacts_saved_before_the_move():
    """ZenML stores an artifact's data type as a source path and loads it with source_utils.load."""
    from zenml.utils import source_utils

    from sidrec.data.dataset import Dataset
    from sidrec.data.validation import QualityReport

    assert source_utils.load("sidrec.data.Dataset") is Dataset
    assert source_utils.load("sidrec.validation.QualityReport") is QualityReport
