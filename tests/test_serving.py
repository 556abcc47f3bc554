"""The pyfunc model (models-from-code, no pickle) and `run.py recommend`, on a small untrained model
built without ZenML (ML-100k slice, tiny backbone, random item embeddings)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sidrec.config import parse_config
from sidrec.ops.serving import parse_history


def test_parse_history():
    assert parse_history("1, 2,3,") == ["1", "2", "3"]
    assert parse_history([1, "2"]) == ["1", "2"]
    assert parse_history(np.array([5, 6])) == ["5", "6"]
    assert parse_history(None) == []


@pytest.fixture(scope="module")
def registered(tmp_path_factory, ml100k_dir):
    import mlflow
    import yaml

    from sidrec import registry, stages
    from sidrec.artifacts import EntityFeatures
    from sidrec.model.sid_model import save_recommender
    from sidrec.ops.tracking import setup_mlflow

    tmp = tmp_path_factory.mktemp("serving")
    raw = {"name": "serving-test", "seed": 0,
           "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 30, "kcore": 3},
           "index": {"codebook_size": 8, "levels": 2, "kmeans_iters": 5},
           "model": {"backbone": "tiny", "dtype": "float32"}, "eval": {"beams": 10, "ks": [1, 5, 10]},
           "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "serving-test"}}
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = parse_config(raw)
    ds = stages.ingest(cfg)
    rng = np.random.default_rng(0)
    feats = EntityFeatures(item_ids=ds.items["item_id"].tolist(), item_texts=[""] * len(ds.items),
                           item_embeddings=rng.normal(size=(len(ds.items), 16)).astype("float32"))
    bundle = stages.build_index(feats, cfg)
    model, tok, _ = stages.build_model(cfg, bundle)
    rec_dir = tmp / "recommender"
    save_recommender(model, tok, rec_dir, {"backbone": "tiny", "train": {}, "lora": cfg.model.lora.model_dump()})
    exp = setup_mlflow(cfg)
    with mlflow.start_run(experiment_id=exp) as run:
        pass
    version = registry.register_model(cfg, run_id=run.info.run_id, recommender_dir=rec_dir, bundle=bundle, dataset=ds,
                                      quality_passed=True)
    client = registry.client_for(cfg)
    client.set_registered_model_alias(registry.model_name(cfg), "champion", version)
    return cfg, cfg_path, ds, version


def test_model_is_code_not_pickle(registered):
    import mlflow

    from sidrec import registry

    cfg, _, _, version = registered
    root = Path(mlflow.artifacts.download_artifacts(f"models:/{registry.model_name(cfg)}/{version}"))
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files
    assert "serving.py" in files and "artifacts/items.csv" in files
    assert any(f.endswith("sid_embeddings.safetensors") for f in files)
    assert any(f.endswith("index/items/index.parquet") for f in files)
    mlmodel = (root / "MLmodel").read_text()
    assert "mlflow.pyfunc.loaders.code_model" in mlmodel


def test_pyfunc_predict(registered):
    import mlflow

    from sidrec import registry
    from sidrec.ops.serving import UnknownItemsError

    cfg, _, ds, version = registered
    pf = mlflow.pyfunc.load_model(f"models:/{registry.model_name(cfg)}@champion")
    items = ds.items["item_id"].tolist()
    sig = pf.metadata.get_params_schema()
    assert [(p.name, p.default) for p in sig.params] == [("k", 10)]  # declared, so params={"k": ...} reaches predict
    out = pf.predict(pd.DataFrame({"history": [",".join(items[:3]), ",".join(items[3:6])], "k": [5, 3]}))
    assert list(out.columns) == ["request", "rank", "item_id", "title", "score"]
    assert (out["request"] == 0).sum() == 5 and (out["request"] == 1).sum() == 3
    for _, g in out.groupby("request"):
        assert g["score"].is_monotonic_decreasing and set(g["item_id"]) <= set(items)
        assert g["title"].str.len().gt(0).all()
    user = pf.predict(pd.DataFrame({"history": [",".join(items[:3])], "k": [5], "user_id": [next(iter(ds.train_sequences()))]}))
    pd.testing.assert_frame_equal(user, out[out["request"] == 0].reset_index(drop=True))  # an items-only model ignores it
    default_k = pf.predict(pd.DataFrame({"history": [",".join(items[:2])]}))
    assert len(default_k) == 10
    assert len(pf.predict(pd.DataFrame({"history": [",".join(items[:2])] * 2}), params={"k": 4})) == 8
    with pytest.raises(UnknownItemsError, match="nope-1"):
        pf.predict(pd.DataFrame({"history": [f"{items[0]},nope-1"]}))


def _cli(*args):
    repo = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "run.py", *args], cwd=repo, capture_output=True, text=True, timeout=300)


def test_cli_recommend_json_and_unknown_ids(registered):
    cfg, cfg_path, ds, _ = registered
    items = ds.items["item_id"].tolist()
    out = _cli("recommend", "--config", str(cfg_path), "--history", ",".join(items[:4]), "--k", "4", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    recs = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(recs) == 4 and all(set(r) == {"item_id", "title", "score"} for r in recs)
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)
    bad = _cli("recommend", "--config", str(cfg_path), "--history", f"{items[0]},zz-unknown")
    assert bad.returncode == 2, bad.stderr[-2000:]
    err = [l for l in bad.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "zz-unknown" in err[0]


def test_mlflow_models_serve_honours_k(registered, tmp_path):
    """A real `mlflow models serve` on 127.0.0.1 for the registered model: a POST with params k=5 gets 5
    items back (before the signature declared k, MLflow dropped the param and returned 10)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from sidrec import registry
    from sidrec.ops.tracking import tracking_uri

    cfg, _, ds, _ = registered
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` starts uvicorn by name
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "MLFLOW_TRACKING_URI": tracking_uri(cfg)}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{registry.model_name(cfg)}@champion",
                             "--host", "127.0.0.1", "-p", str(port), "--env-manager", "local", "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        items = ds.items["item_id"].tolist()
        body = json.dumps({"dataframe_records": [{"history": ",".join(items[:3])}], "params": {"k": 5}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            preds = json.loads(r.read())["predictions"]
        assert len(preds) == 5 and [p["rank"] for p in preds] == [1, 2, 3, 4, 5], preds
        assert {p["item_id"] for p in preds} <= set(items)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
