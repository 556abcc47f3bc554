"""sidrec: LLM-based generative recommendation with semantic IDs.

The library is pure Python/PyTorch/pandas and never imports ZenML; the ZenML steps in `steps/` are
thin wrappers around `sidrec.stages`. Subpackages by concern (docs/architecture.md): `index`, `model`,
`data`, `training`, `evaluation`, `ops`, over the foundations `errors`, `config`, `runtime`.

Earlier versions had flat modules (`sidrec.tasks`, `sidrec.serving`, `sidrec.validation`, ...). What
they saved names them: registered MLflow models (their `serving.py` imports `sidrec.serving`,
`sidrec.tasks`, `sidrec.decode`) and ZenML artifacts (`sidrec.validation.QualityReport`). Those old
names still import, as the same module objects as the new ones (`MOVED`).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# old flat module -> where it lives now (sidrec.index, sidrec.model and sidrec.data are packages that
# export the old modules' public names themselves)
MOVED = {
    "kmeans": "index.kmeans", "collisions": "index.collisions", "quantize": "index.quantize", "collab": "index.collab",
    "keywords": "index.keywords", "dynamic": "index.dynamic",
    "decode": "model.decode", "sid_init": "model.sid_init", "assets": "model.assets",
    "readers": "data.readers", "validation": "data.validation", "profile": "data.profile", "text": "data.text",
    "tasks": "data.tasks", "embedding_cache": "data.embedding_cache",
    "train": "training.loop", "parallel": "training.parallel",
    "metrics": "evaluation.metrics", "evaluate": "evaluation.evaluate", "baselines": "evaluation.baselines",
    "tracking": "ops.tracking", "registry": "ops.registry", "drift": "ops.drift", "compare": "ops.compare",
    "reports": "ops.reports", "schedule": "ops.schedule", "serving": "ops.serving",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``sidrec.<old>`` as the module now at ``sidrec.<MOVED[old]>`` (one module object, so a
    monkeypatch or an isinstance check through either name sees the same thing)."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname[len("sidrec."):] if fullname.startswith("sidrec.") else None
        return importlib.util.spec_from_loader(fullname, self) if old in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(f"sidrec.{MOVED[spec.name[len('sidrec.'):]]}")

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())  # before any path finder: an old file left on disk must not win
