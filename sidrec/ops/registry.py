"""The MLflow model registry: register a trained recommender, gate promotions, roll back.

- :func:`register_model` registers the training run's LoggedModel (the pyfunc, ``sidrec/ops/serving.py`` as
  code + safe artifacts, :mod:`sidrec.ops.logged_model`) as a new version of ``sidrec-<dataset>`` with
  alias ``challenger``.
- :func:`decide` is the promotion gate as a pure function.
- :func:`promote` re-scores the challenger and the current champion on the same newest test set,
  applies :func:`decide`, moves alias ``champion`` (under a file lock) only when it passes, and writes
  the decision to the version's tags/description and to a JSON-lines decision log.
- :func:`rollback` moves ``champion`` back to the previous champion.

Nothing is ever deleted: versions stay, aliases move, every decision is appended to the log and
the registered model's ``champion_history`` tag (a JSON list of versions, oldest first).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from sidrec.config import RunConfig
from sidrec.errors import ModelError, SidrecError
from sidrec.ops.logged_model import MODEL_ID_TAG, data_profile, log_recommender, serving_signature  # noqa: F401 (public here too)

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"


class RegistryError(SidrecError):
    """A registry operation cannot be done (no challenger, nothing to roll back to, lock timeout)."""


# ------------------------------------------------------------------------------------ names/paths
def model_name(cfg: RunConfig) -> str:
    return cfg.registry.model_name or f"sidrec-{cfg.data.dataset_name}"


def state_dir(cfg: RunConfig) -> Path:
    """Where the decision log and locks live: next to a sqlite store, else $SIDREC_HOME."""
    from sidrec.ops.tracking import tracking_uri

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent
    from sidrec.runtime import state_home

    return state_home()


def decision_log_path(cfg: RunConfig) -> Path:
    if cfg.registry.decision_log:
        return Path(cfg.registry.decision_log).expanduser()
    return state_dir(cfg) / "decisions" / f"{model_name(cfg)}.jsonl"


def lock_path(cfg: RunConfig) -> Path:
    d = Path(cfg.registry.lock_dir).expanduser() if cfg.registry.lock_dir else decision_log_path(cfg).parent
    return d / f"{model_name(cfg)}.promote.lock"


def client_for(cfg: RunConfig):
    import mlflow
    from mlflow import MlflowClient

    from sidrec.ops.tracking import setup_mlflow

    setup_mlflow(cfg)
    return MlflowClient(mlflow.get_tracking_uri())


def alias_version(client, name: str, alias: str) -> Optional[str]:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:  # no such alias / model
        return None


# ------------------------------------------------------------------------------------ the gate
@dataclass
class Decision:
    promote: bool
    reason: str
    kind: str  # "first" (vs popularity) | "vs_champion"
    checks: list[dict] = field(default_factory=list)
    challenger: dict = field(default_factory=dict)
    champion: Optional[dict] = None
    popularity: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def decide(challenger: dict, champion: Optional[dict], popularity: dict, cfg) -> Decision:
    """The promotion gate (pure). ``cfg`` is a :class:`sidrec.config.PromotionConfig`.

    Metric dicts use the MLflow names (``test/recall_at_10``...). ``challenger`` also carries
    ``test/invalid_rate`` and ``data_validation_passed`` (bool). Every gate metric is "higher is
    better". With no champion the challenger must beat popularity (not worse on any gate metric and
    strictly better on at least one), unless ``cfg.beat_popularity`` is off.
    """
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "passed": bool(ok), "detail": detail})

    if cfg.require_validation:
        v = challenger.get("data_validation_passed")
        check("data_validation", v is True, "passed" if v is True else ("not recorded" if v is None else "failed"))
    inv = challenger.get("test/invalid_rate")
    check("invalid_rate", inv is not None and inv <= cfg.max_invalid_rate,
          f"{inv} <= {cfg.max_invalid_rate}" if inv is not None else "test/invalid_rate missing")
    missing = [m for m in cfg.metrics if challenger.get(m) is None]
    if missing:
        check("metrics_present", False, f"challenger lacks {', '.join(missing)}")
    if champion is None:
        kind = "first"
        if cfg.beat_popularity:
            gaps = {m: (challenger.get(m), popularity.get(m)) for m in cfg.metrics}
            if any(p is None for _, p in gaps.values()):
                check("beats_popularity", False, "popularity metrics missing")
            elif not missing:
                not_worse = all(c >= p for c, p in gaps.values())
                better = any(c > p for c, p in gaps.values())
                check("beats_popularity", not_worse and better,
                      "; ".join(f"{m}: {c:.4f} vs popularity {p:.4f}" for m, (c, p) in gaps.items()))
    else:
        kind = "vs_champion"
        for m in cfg.metrics:
            c, h = challenger.get(m), champion.get(m)
            if c is None or h is None:
                check(f"not_worse:{m}", False, "metric missing")
                continue
            check(f"not_worse:{m}", c >= h - cfg.tolerance, f"{c:.4f} vs champion {h:.4f} (tolerance {cfg.tolerance})")
    failed = [c for c in checks if not c["passed"]]
    promote = not failed
    if promote:
        reason = ("first model: beats popularity" if kind == "first" and cfg.beat_popularity else
                  "first model" if kind == "first" else "not worse than the champion on " + ", ".join(cfg.metrics))
        reason += " (" + "; ".join(c["detail"] for c in checks if c["check"].startswith(("beats", "not_worse"))) + ")"
    else:
        reason = "rejected: " + "; ".join(f"{c['check']} ({c['detail']})" for c in failed)
    return Decision(promote=promote, reason=reason, kind=kind, checks=checks, challenger=dict(challenger),
                    champion=dict(champion) if champion is not None else None, popularity=dict(popularity))


# ------------------------------------------------------------------------------------ registration
def register_model(cfg: RunConfig, *, run_id: str, recommender_dir, bundle, dataset, quality_passed: Optional[bool] = None,
                   extra_tags: Optional[dict] = None, log_new: bool = False) -> str:
    """Register training run ``run_id``'s model -- the LoggedModel logged with the run, or, when the run has
    none or ``log_new`` is set, the pyfunc of ``recommender_dir`` + ``bundle`` + ``dataset`` logged into the
    run now; alias ``challenger``. Returns the version."""
    import mlflow

    client = client_for(cfg)
    name = model_name(cfg)
    run = client.get_run(run_id)
    if quality_passed is not None:
        client.set_tag(run_id, "data_validation", "passed" if quality_passed else "failed")
    validation = "passed" if quality_passed else (run.data.tags.get("data_validation") or ("failed" if quality_passed is False else "unknown"))
    model_id = None if log_new else run.data.tags.get(MODEL_ID_TAG)
    if model_id:  # logged at training time (sidrec.ops.tracking.log_training_run): register that LoggedModel
        model_uri = f"models:/{model_id}"
    else:  # a run logged without its model (earlier versions, or a hand-made run): log it now
        with mlflow.start_run(run_id=run_id):
            model_uri = log_recommender(cfg, recommender_dir, bundle, dataset).model_uri
    mv = mlflow.register_model(model_uri, name, tags={
        "run_id": run_id, "dataset_hash": run.data.tags.get("dataset_hash", dataset.fingerprint()),
        "data_validation": validation, "backbone": cfg.model.backbone, "config_name": cfg.name,
        "zenml_run_id": run.data.tags.get("zenml_run_id", ""), **{k: str(v) for k, v in (extra_tags or {}).items()},
    })
    version = str(mv.version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    client.update_model_version(name, version, description=f"registered from run {run_id} ({cfg.name}); awaiting the promotion gate")
    _append_log(cfg, {"action": "register", "model": name, "version": version, "run_id": run_id, "data_validation": validation})
    return version


# ------------------------------------------------------------------------------------ scoring
def load_pyfunc_recommender(cfg: RunConfig, version: str):
    """The :class:`sidrec.ops.serving.Recommender` inside registered version ``version``."""
    import mlflow.pyfunc

    client_for(cfg)
    pf = mlflow.pyfunc.load_model(f"models:/{model_name(cfg)}/{version}")
    return pf.unwrap_python_model().rec


def _test_users(ds, cfg: RunConfig) -> pd.DataFrame:
    full = ds.split("test", None)
    split = full.assign(seen=full["history"])  # every item before the target
    split["history"] = pd.Series([h[-cfg.data.max_history:] for h in full["history"]], index=full.index, dtype=object)
    n = cfg.promotion.test_max_users
    if n is not None and n < len(split):
        split = split.sample(n=n, random_state=cfg.seed).sort_index().reset_index(drop=True)
    return split


def score_recommender(rec, split: pd.DataFrame, cfg: RunConfig) -> dict:
    """Test metrics of a loaded recommender on ``split`` (user_id, history, target).

    Users whose target item the model does not know (new items) count as misses; unknown items in a
    history are dropped from its prompt. So two models with different catalogs are scored on the
    same users and the same denominators.
    """
    from sidrec.evaluation.evaluate import evaluate_llm

    known = rec.index  # SIDIndex: `id in known`
    users, prompts, targets, seen, hists = [], [], [], [], []
    all_seen = split["seen"] if "seen" in split.columns else split["history"]
    for u, hist, t, before in zip(split["user_id"], split["history"], split["target"], all_seen):
        seen.append(list(before))
        hist = [h for h in hist if h in known]
        if t not in known or not hist:
            seen.pop()
            continue
        users.append(u)
        hists.append(hist)
        prompts.append(rec.prompt_text(hist))
        targets.append(t)
    total = len(split)
    if not users:  # every target (or history) is outside this model's catalog: all misses
        zeros = {f"test/{m}_at_{k}": 0.0 for m in ("recall", "ndcg") for k in cfg.eval.ks}
        return {**zeros, "test/invalid_rate": 0.0, "test/users": total, "test/scored_share": 0.0}
    rows = pd.DataFrame({"user_id": users, "prompt": prompts, "target_item": targets, "seen": seen})
    ecfg = cfg.eval.model_copy(update={"test_max_users": None, "valid_max_users": None})
    member_parts = None
    if getattr(rec, "fused", False):  # members on their own indexes: each reads the histories in its own SIDs
        member_parts = [{"test": rows.assign(prompt=texts)} for texts in rec.member_texts(hists)]
    metrics, _ = evaluate_llm(rec.model, rec.encoder, rec.index, {"test": rows}, ecfg, cfg.seed, rec.dtype, progress=False,
                              member_parts=member_parts)
    share = len(users) / total
    out = {k: (v * share if k.split("/")[1].startswith(("recall_at", "ndcg_at")) else v) for k, v in metrics.items()}
    out["test/users"] = total
    out["test/scored_share"] = share
    return out


def popularity_scores(ds, split: pd.DataFrame, cfg: RunConfig) -> dict:
    from sidrec.evaluation.baselines import popularity_ranked
    from sidrec.evaluation.metrics import ranking_metrics

    index = ds.item_index()
    train = [[index[i] for i in seq] for seq in ds.train_sequences().values()]
    targets = np.array([index[t] for t in split["target"]])
    seen = None
    if cfg.eval.exclude_history:  # as the LLM is scored (evaluate_llm drops the seen items)
        seen = [{index[i] for i in h if i in index} for h in (split["seen"] if "seen" in split.columns else split["history"])]
    ranked = popularity_ranked(train, len(index), len(targets), max(cfg.eval.ks), exclude=seen)
    return {f"test/{k}": v for k, v in ranking_metrics(ranked, targets, cfg.eval.ks).items()}


# ------------------------------------------------------------------------------------ promotion
def _append_log(cfg: RunConfig, record: dict) -> Path:
    path = decision_log_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}
    with open(path, "a", encoding="utf-8") as f:  # one write per line: appends do not interleave
        f.write(json.dumps(record, default=str, sort_keys=True) + "\n")
    return path


def read_log(cfg: RunConfig) -> list[dict]:
    path = decision_log_path(cfg)
    if not path.is_file():
        return []
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def _lock(cfg: RunConfig, timeout: float = 3600):
    from filelock import FileLock

    p = lock_path(cfg)
    p.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(p), timeout=timeout)


def _history(client, name: str) -> list[str]:
    try:
        return list(json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]")))
    except Exception:
        return []


def _set_champion(client, name: str, version: str, history: list[str]) -> None:
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def _apply_stage_hook(client, name: str, version: str, hook) -> str:
    """Mirror the new champion elsewhere (the CLI/steps pass one that moves the ZenML model version of the
    version's training run to stage ``production``). The MLflow alias is what serving reads, so a failing
    hook is reported in the decision, not raised."""
    if hook is None:
        return ""
    run_id = (client.get_model_version(name, version).tags or {}).get("zenml_run_id", "")
    try:
        out = hook(run_id) if run_id else "no zenml_run_id tag on the model version"
    except Exception as e:  # noqa: BLE001 -- bookkeeping must not undo a promotion
        out = f"not set ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    client.set_model_version_tag(name, version, "zenml.stage", out)
    return out


def _run_facts(client, name: str, version: str) -> dict:
    mv = client.get_model_version(name, version)
    tags = dict(mv.tags or {})
    run_tags = {}
    if mv.run_id:
        try:
            run_tags = client.get_run(mv.run_id).data.tags
        except Exception:
            pass
    v = tags.get("data_validation") if tags.get("data_validation") in ("passed", "failed") else run_tags.get("data_validation")
    return {"run_id": mv.run_id, "data_validation_passed": True if v == "passed" else (False if v == "failed" else None)}


def promote(cfg: RunConfig, version: Optional[str] = None, dataset=None, stage_hook=None) -> dict:
    """Gate the challenger (or ``version``) against the champion; returns the decision record.

    ``stage_hook(zenml_run_id) -> str``, when given, runs after a promotion (see :func:`_apply_stage_hook`)."""
    from sidrec.data.dataset import load_dataset

    client = client_for(cfg)
    name = model_name(cfg)
    with _lock(cfg):
        challenger = version or alias_version(client, name, CHALLENGER)
        if challenger is None:
            raise RegistryError(f"{name}: no challenger to promote (train with `run.py train --register` first)")
        champion = alias_version(client, name, CHAMPION)
        if champion == challenger:
            rec = {"action": "promote", "model": name, "challenger": challenger, "champion": champion, "promoted": False,
                   "new_champion": champion, "reason": f"version {challenger} is already the champion"}
            _append_log(cfg, rec)
            return rec
        ds = dataset if dataset is not None else load_dataset(cfg.data)
        split = _test_users(ds, cfg)
        facts = _run_facts(client, name, challenger)
        ch_metrics = {**score_recommender(load_pyfunc_recommender(cfg, challenger), split, cfg),
                      "data_validation_passed": facts["data_validation_passed"]}
        cp_metrics = score_recommender(load_pyfunc_recommender(cfg, champion), split, cfg) if champion else None
        pop = popularity_scores(ds, split, cfg)
        d = decide(ch_metrics, cp_metrics, pop, cfg.promotion)
        history = _history(client, name)
        if champion and (not history or history[-1] != champion):
            history.append(champion)  # champion set by hand: keep the trail
        if d.promote:
            history.append(challenger)
            _set_champion(client, name, challenger, history)
        rec = {"action": "promote", "model": name, "challenger": challenger, "champion": champion,
               "promoted": d.promote, "new_champion": challenger if d.promote else champion, "dataset_hash": ds.fingerprint(),
               "test_users": len(split), "kind": d.kind, "reason": d.reason, "checks": d.checks,
               "metrics": {"challenger": d.challenger, "champion": d.champion, "popularity": d.popularity}}
        _tag_decision(client, name, challenger, rec)
        if d.promote and stage_hook is not None:
            rec["zenml_stage"] = _apply_stage_hook(client, name, challenger, stage_hook)
        rec["decision_log"] = str(_append_log(cfg, rec))
        return rec


def _tag_decision(client, name: str, version: str, rec: dict) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    tags = {"gate.decision": "promoted" if rec["promoted"] else "rejected", "gate.reason": rec["reason"][:4900],
            "gate.kind": rec["kind"], "gate.time": stamp, "gate.compared_with": str(rec.get("champion") or "popularity")}
    for side in ("challenger", "champion", "popularity"):
        for k, v in (rec["metrics"].get(side) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k.split("/")[-1] in (
                    "recall_at_10", "ndcg_at_10", "invalid_rate", "recall_at_5", "ndcg_at_5", "scored_share"):
                tags[f"gate.{side}.{k.replace('/', '.')}"] = f"{v:.6f}"
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    verdict = "PROMOTED to champion" if rec["promoted"] else "NOT promoted"
    client.update_model_version(name, version, description=f"[{stamp}] gate: {verdict}. {rec['reason']}"[:5000])


def rollback(cfg: RunConfig, stage_hook=None) -> dict:
    """Move ``champion`` back to the previous champion (from ``champion_history``)."""
    client = client_for(cfg)
    name = model_name(cfg)
    with _lock(cfg):
        current = alias_version(client, name, CHAMPION)
        if current is None:
            raise RegistryError(f"{name}: there is no champion to roll back")
        history = _history(client, name)
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise RegistryError(f"{name}: champion v{current} has no previous champion to roll back to")
        previous = history[-1]
        _set_champion(client, name, previous, history)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        client.set_model_version_tag(name, current, "gate.rolled_back", stamp)
        client.set_model_version_tag(name, previous, "gate.restored_by_rollback", stamp)
        rec = {"action": "rollback", "model": name, "from": current, "to": previous, "promoted": False,
               "reason": f"rollback: champion v{current} -> v{previous}"}
        if stage_hook is not None:
            rec["zenml_stage"] = _apply_stage_hook(client, name, previous, stage_hook)
        rec["decision_log"] = str(_append_log(cfg, rec))
        return rec
