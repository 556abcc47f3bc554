"""Supply-chain and exposure checks on the project's own code and artifacts.

- no code path deserialises with pickle: no pickle/cloudpickle/dill/joblib/marshal/shelve import,
  no pandas read_pickle/to_pickle, no numpy allow_pickle=True, no torch.load without
  weights_only=True, no yaml.load without SafeLoader (yaml.safe_load is fine), and no
  trust_remote_code=True (remote code from a model folder would run on load);
- what the materializers write is JSON / Parquet / safetensors / PNG / HTML (plus the static
  assets of the Great Expectations Data Docs site and the tokenizer's chat template) -- checked
  on the artifact store of a real pipeline run when one is available in the session, and always on
  each materializer's output for small artifacts;
- servers bind 127.0.0.1 by default (Makefile `ui`, `run.py ui`, any `--host` default in the code).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = ("sidrec", "steps", "materializers", "pipelines", "scripts", "bench", "infra", "tests")
THIS = Path(__file__).resolve()

FORBIDDEN_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve", "_pickle"}
# file suffixes a materializer may write (GE Data Docs ship css/js/fonts/images; tokenizers a jinja template)
ALLOWED_SUFFIXES = {
    ".json", ".jsonl", ".parquet", ".safetensors", ".png", ".html", ".md", ".csv", ".txt",
    ".css", ".js", ".svg", ".gif", ".ico", ".otf", ".ttf", ".woff", ".woff2", ".eot", ".jinja", ".log",
}
FORBIDDEN_SUFFIXES = {".pkl", ".pickle", ".joblib", ".pt", ".pth", ".bin", ".npy", ".npz", ".ckpt", ".dill", ".cloudpickle"}


def _py_files() -> list[Path]:
    files = [REPO / "run.py"]
    for d in CODE_DIRS:
        files += sorted((REPO / d).rglob("*.py")) if (REPO / d).is_dir() else []
    return [f for f in files if f.resolve() != THIS and ".venv" not in f.parts]


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Findings (``file:line: what``) for one Python source."""
    out = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in FORBIDDEN_MODULES:
                    out.append(f"{where}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FORBIDDEN_MODULES:
            out.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if last == "load" and name.split(".")[0] == "torch":
                if not _is_true(_kw(node, "weights_only")):
                    out.append(f"{where}: {name}() without weights_only=True")
            if name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if name != "yaml.load" or loader is None or "Safe" not in _dotted(loader):
                    out.append(f"{where}: {name}() without SafeLoader (use yaml.safe_load)")
            if last in ("read_pickle", "to_pickle"):
                out.append(f"{where}: {name}()")
            if _is_true(_kw(node, "allow_pickle")):
                out.append(f"{where}: {name}(allow_pickle=True)")
            if _is_true(_kw(node, "trust_remote_code")):
                out.append(f"{where}: {name}(trust_remote_code=True)")
        elif isinstance(node, ast.Dict):  # {"trust_remote_code": True} passed as **kwargs
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and _is_true(v):
                    out.append(f"{where}: trust_remote_code=True in a dict")
    return out


def test_scanner_catches_what_it_should():
    bad = """
import pickle
from cloudpickle import dumps
import torch, yaml, numpy as np, pandas as pd
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
yaml.load(open("c.yaml"))
yaml.load(open("c.yaml"), Loader=yaml.Loader)
np.load("a.npy", allow_pickle=True)
pd.read_pickle("a.pkl")
AutoModel.from_pretrained("m", trust_remote_code=True)
kw = {"trust_remote_code": True}
"""
    found = unsafe_calls(bad)
    assert len(found) == 10, found
    ok = """
import torch, yaml
torch.load("x.pt", weights_only=True)
yaml.safe_load("a: 1")
yaml.load("a: 1", Loader=yaml.SafeLoader)
AutoModel.from_pretrained("m", trust_remote_code=False)
model.eval()
"""
    assert unsafe_calls(ok) == []


def test_project_code_has_no_unsafe_deserialisation():
    findings = []
    for f in _py_files():
        findings += unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))
    assert not findings, "unsafe deserialisation / remote code:\n" + "\n".join(findings)


def test_yaml_and_shell_files_do_not_enable_remote_code():
    hits = []
    for f in [*REPO.glob("configs/*.yaml"), REPO / "Makefile", *REPO.glob(".ci/*"), *REPO.glob("infra/**/*")]:
        if f.is_file() and re.search(r"trust_remote_code\s*[:=]\s*(true|True)", f.read_text(errors="replace")):
            hits.append(str(f.relative_to(REPO)))
    assert not hits


# ----------------------------------------------------------------------------------------------
# artifacts
# ----------------------------------------------------------------------------------------------
def _bad_files(root: Path) -> list[str]:
    bad = []
    for p in root.rglob("*"):
        if not p.is_file() or p.name == "zenml.db":
            continue
        suf = p.suffix.lower()
        if suf in FORBIDDEN_SUFFIXES or suf not in ALLOWED_SUFFIXES:
            bad.append(str(p.relative_to(root)))
    return bad


def test_materializers_write_only_safe_formats(tmp_path, ml100k_dir):
    """Every sidrec materializer's output for small real artifacts (no pipeline run needed)."""
    import numpy as np

    from materializers import (
        DatasetMaterializer, EntityFeaturesMaterializer, IndexBundleMaterializer, InstructionSetMaterializer,
    )
    from sidrec.artifacts import EntityFeatures
    from sidrec.config import parse_config
    from sidrec.stages import build_index, ingest, instruct

    cfg = parse_config({"data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 10, "kcore": 3},
                        "index": {"codebook_size": 4, "levels": 2, "kmeans_iters": 3}})
    ds = ingest(cfg)
    feats = EntityFeatures(item_ids=ds.items["item_id"].tolist(), item_texts=["t"] * len(ds.items),
                           item_embeddings=np.random.default_rng(0).normal(size=(len(ds.items), 8)).astype("float32"))
    bundle = build_index(feats, cfg)
    instr = instruct(ds, bundle, cfg)
    for i, (mat, obj) in enumerate([(DatasetMaterializer, ds), (EntityFeaturesMaterializer, feats),
                                    (IndexBundleMaterializer, bundle), (InstructionSetMaterializer, instr)]):
        uri = tmp_path / f"a{i}"
        uri.mkdir()
        m = mat(str(uri))
        m.save(obj)
        m.save_visualizations(obj)
        written = [p for p in uri.rglob("*") if p.is_file()]
        assert written, mat.__name__
        assert not _bad_files(uri), (mat.__name__, _bad_files(uri))
        assert m.load(type(obj)) is not None  # what was written is enough to load it back


def test_pipeline_artifact_store_has_no_pickle():
    """The session's ZenML artifact store (filled by the pipeline tests when they ran first)."""
    import os

    root = Path(os.environ["ZENML_CONFIG_PATH"]) / "local_stores"
    stores = [p for p in root.glob("*") if p.is_dir() and p.name != "default_zen_store"] if root.is_dir() else []
    if not stores or not any(p.suffix == ".safetensors" for s in stores for p in s.rglob("*")):
        pytest.skip("no pipeline run in this session yet (run with tests/test_pipeline.py or test_concurrency.py)")
    bad = [f"{s.name}/{b}" for s in stores for b in _bad_files(s)]
    assert not bad, bad


# ----------------------------------------------------------------------------------------------
# network exposure
# ----------------------------------------------------------------------------------------------
def test_servers_bind_localhost_by_default():
    mk = (REPO / "Makefile").read_text()
    ui_lines = [ln for ln in mk.splitlines() if "mlflow ui" in ln or "mlflow server" in ln or "zenml up" in ln]
    assert ui_lines and all("--host 127.0.0.1" in ln for ln in ui_lines), ui_lines
    offenders = []
    for f in _py_files() + [REPO / "Makefile", *REPO.glob("configs/*.yaml")]:
        if f.parent.name == "tests":
            continue
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if re.search(r"0\.0\.0\.0", line) and not re.search(r"only if|yourself|never|#.*0\.0\.0\.0", line):
                offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
            if re.search(r"""(host|bind)\s*[=:]\s*['"](0\.0\.0\.0|::|\*)['"]""", line):
                offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_cli_ui_prints_localhost(capsys):
    from pipelines.cli import main

    assert main(["ui"]) == 0
    out = capsys.readouterr().out
    assert "--host 127.0.0.1" in out and "0.0.0.0" not in out
