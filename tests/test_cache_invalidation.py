"""Changing the source of a `sidrec` helper a step depends on invalidates that step's ZenML cache,
and only that step's.

Honest version of the check: the project is copied to a temp folder (data and models linked), a
three-step pipeline (`ingest` -> random features -> `sid_quantization`, the real steps) runs there in
a subprocess twice (second run: everything cached), then a function body in the copy's
`sidrec/index/collisions.py` (split out of quantize.py; the quantizer's collision handling) is edited and a *new*
process runs it again: `sid_quantization` re-runs (its CachePolicy lists every module of the quantizer:
sidrec.index.quantize, sidrec.index.kmeans, sidrec.index.collisions) while `ingest` stays cached.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent

PROBE = r'''
import json, os, sys
from pathlib import Path
from typing import Annotated

from pipelines.cli import _ensure_zenml_repo, setup_environment

setup_environment()
import sidrec
assert Path(sidrec.__file__).resolve().parent.parent == Path.cwd().resolve(), sidrec.__file__
_ensure_zenml_repo()

import numpy as np
from zenml import pipeline, step

from materializers import EntityFeaturesMaterializer
from sidrec.artifacts import EntityFeatures
from sidrec.data.dataset import Dataset
from steps import ingest, sid_quantization


@step(output_materializers=EntityFeaturesMaterializer)
def random_features(dataset: Dataset) -> Annotated[EntityFeatures, "features"]:
    rng = np.random.default_rng(0)
    n = len(dataset.items)
    return EntityFeatures(item_ids=dataset.items["item_id"].tolist(), item_texts=[""] * n,
                          item_embeddings=rng.normal(size=(n, 8)).astype("float32"))


@pipeline(enable_cache=True)
def cache_probe(config: dict):
    ds = ingest(config=config)
    feats = random_features(dataset=ds)
    sid_quantization(features=feats, config=config)


config = json.loads(sys.argv[1])
append = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None  # [file, text]: appended between runs
probe = cache_probe.with_options(run_name="probe-{date}-{time}")  # ONE built pipeline object, run N times
out = []
for i in range(int(sys.argv[2])):
    if append and i:
        with open(append[0], "a") as f:
            f.write(append[1])
    run = probe(config=config)
    st = {name: str(s.status).rsplit(".", 1)[-1].lower() for name, s in run.steps.items()}
    st["n_interactions"] = len(run.steps["ingest"].outputs["dataset"][0].load().interactions)
    out.append(st)
print("STATUSES " + json.dumps(out))
'''


def _copy_project(dst: Path) -> None:
    for name in ("sidrec", "steps", "materializers", "pipelines"):
        shutil.copytree(REPO / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("run.py", "pyproject.toml"):
        shutil.copy2(REPO / name, dst / name)
    for name in ("data", "models"):
        (dst / name).symlink_to(REPO / name)
    (dst / "probe.py").write_text(PROBE)


def _run(copy: Path, env: dict, config: dict, times: int, append: list | None = None) -> list[dict]:
    extra = [json.dumps(append)] if append else []
    out = subprocess.run([sys.executable, "probe.py", json.dumps(config), str(times), *extra], cwd=copy, env=env,
                         capture_output=True, text=True, timeout=400)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("STATUSES ")]
    assert out.returncode == 0 and lines, (out.stdout[-2000:], out.stderr[-4000:])
    return json.loads(lines[-1][len("STATUSES "):])


def test_editing_a_helper_reruns_only_the_steps_that_depend_on_it(tmp_path, ml100k_dir):
    copy = tmp_path / "proj"
    copy.mkdir()
    _copy_project(copy)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZENML_", "SIDREC_", "PYTHONPATH"))}
    env.update({"SIDREC_HOME": str(tmp_path / "home"), "ZENML_CONFIG_PATH": str(tmp_path / "zen"),
                "SIDREC_PROGRESS": "0", "ZENML_ANALYTICS_OPT_IN": "false", "ZENML_LOGGING_VERBOSITY": "WARN"})
    config = {"seed": 0, "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 20, "kcore": 3},
              "index": {"codebook_size": 4, "levels": 2, "kmeans_iters": 3}}

    first, second = _run(copy, env, config, 2)
    n = first.pop("n_interactions")
    assert second.pop("n_interactions") == n
    assert set(first.values()) == {"completed"}, first
    # unchanged source and data: ingest re-reads (never cached), everything after it is cached
    assert second == {"ingest": "completed", "random_features": "cached", "sid_quantization": "cached"}, second

    q = copy / "sidrec" / "index" / "collisions.py"
    src = q.read_text()
    marker = "def count_duplicates(codes: np.ndarray) -> int:\n"
    assert marker in src
    # a real edit of a function body (same behaviour, different source)
    q.write_text(src.replace(marker, marker + "    codes = np.asarray(codes)  # edited by test_cache_invalidation\n", 1))
    (third,) = _run(copy, env, config, 1)
    assert third["sid_quantization"] == "completed", third
    assert third["random_features"] == "cached", third  # the step that does not depend on collisions.py


def test_a_built_pipeline_run_again_sees_new_data(tmp_path, ml100k_dir):
    """The scheduled-retraining bug: a pipeline object built once (as a ZenML Schedule builds it) and run
    again after rows were appended to its data must ingest -- and train on -- the new rows."""
    copy = tmp_path / "proj"
    copy.mkdir()
    _copy_project(copy)
    data = tmp_path / "ml"
    shutil.copytree(ml100k_dir, data)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZENML_", "SIDREC_", "PYTHONPATH"))}
    env.update({"SIDREC_HOME": str(tmp_path / "home"), "ZENML_CONFIG_PATH": str(tmp_path / "zen"),
                "SIDREC_PROGRESS": "0", "ZENML_ANALYTICS_OPT_IN": "false", "ZENML_LOGGING_VERBOSITY": "WARN"})
    config = {"seed": 0, "data": {"format": "recbole", "path": str(data), "kcore": 3},
              "index": {"codebook_size": 4, "levels": 2, "kmeans_iters": 3}}
    new_rows = "".join(f"196\t{item}\t4\t{900000000 + k}\n" for k, item in enumerate((1, 2, 3, 4, 5, 7, 8, 9)))
    first, second = _run(copy, env, config, 2, append=[str(data / "ml-100k.inter"), new_rows])
    assert second["n_interactions"] == first["n_interactions"] + 8  # the second run read the new rows
    assert second["random_features"] == "completed" and second["sid_quantization"] == "completed", second
