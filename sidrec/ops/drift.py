"""Retraining on newer data: the drift report, new-item SIDs without re-fitting the quantizer, and
warm-starting from the champion's adapter.

- :func:`compare` / :func:`report_html`: newest data vs the champion's training data (the
  ``data_profile.json`` stored with every registered model): new/removed users and items,
  interaction volume, popularity shift (top-K overlap, total-variation distance), text coverage.
- :func:`extend_index`: keep every existing SID; assign SIDs to new items with the saved
  quantizer state (:func:`sidrec.index.quantize.assign_new`), so the champion's SIDs stay valid.
- :func:`warm_finetune`: LoRA fine-tuning that starts from the champion's adapter and SID
  embeddings when the backbone, LoRA shape and SID vocabulary are compatible; else from scratch.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from sidrec.config import RunConfig


# ------------------------------------------------------------------------------ champion files
def download_champion(cfg: RunConfig, alias: str = "champion") -> Optional[Path]:
    """Local folder of the ``alias`` model version's files, or None when there is no such alias."""
    import mlflow

    from sidrec.ops.registry import client_for, alias_version, model_name

    client = client_for(cfg)
    name = model_name(cfg)
    v = alias_version(client, name, alias)
    if v is None:
        return None
    dst = Path(tempfile.mkdtemp(prefix=f"sidrec-{alias}-v{v}-"))
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{v}", dst_path=str(dst))
    (dst / ".version").write_text(v)
    return dst


def _find(root: Path, marker: str) -> Optional[Path]:
    """The shallowest ``marker`` under ``root`` (a seed ensemble's own vocab.json, not a member's)."""
    hits = sorted(root.rglob(marker), key=lambda p: (len(p.parts), str(p)))
    return hits[0] if hits else None


def champion_parts(root: Path) -> dict:
    """Paths of the artifacts inside a downloaded model folder."""
    vocab = _find(root, "vocab.json")
    idx = _find(root, "index.parquet")
    prof = _find(root, "data_profile.json")
    return {"recommender": vocab.parent if vocab else None,
            "index": idx.parent.parent if idx else None,  # <bundle>/items/index.parquet
            "profile": prof, "version": (root / ".version").read_text() if (root / ".version").is_file() else None}


def champion_profile(cfg: RunConfig) -> Optional[dict]:
    root = download_champion(cfg)
    if root is None:
        return None
    p = champion_parts(root)["profile"]
    if p is None:
        return None
    prof = json.loads(p.read_text())
    prof["model_version"] = (root / ".version").read_text()
    return prof


# ------------------------------------------------------------------------------ drift report
def _tvd(a: dict, b: dict) -> float:
    keys = set(a) | set(b)
    sa, sb = sum(a.values()) or 1, sum(b.values()) or 1
    return 0.5 * float(sum(abs(a.get(k, 0) / sa - b.get(k, 0) / sb) for k in keys))


def _top(counts: dict, k: int) -> list[str]:
    return [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def compare(old: Optional[dict], new: dict, top_k: int = 20) -> dict:
    """Drift between two :func:`sidrec.ops.registry.data_profile` dicts (``old`` None: no champion yet)."""
    out = {"baseline": "none" if old is None else f"champion v{old.get('model_version', '?')} ({old.get('fingerprint', '?')})",
           "new_fingerprint": new["fingerprint"], "new_interactions": new["stats"]["n_interactions"],
           "new_users_total": new["stats"]["n_users"], "new_items_total": len(new["items"]),
           "new_text_coverage": new["text_coverage"]}
    if old is None:
        return out
    ou, nu = set(old["users"]), set(new["users"])
    oi, ni = set(old["items"]), set(new["items"])
    top_old, top_new = _top(old["item_counts"], top_k), _top(new["item_counts"], top_k)
    out.update({
        "users_added": len(nu - ou), "users_removed": len(ou - nu),
        "items_added": len(ni - oi), "items_removed": len(oi - ni),
        "items_added_sample": sorted(ni - oi)[:20], "items_removed_sample": sorted(oi - ni)[:20],
        "old_interactions": old["stats"]["n_interactions"],
        "interaction_ratio": new["stats"]["n_interactions"] / max(old["stats"]["n_interactions"], 1),
        "popularity_tvd": _tvd(old["item_counts"], new["item_counts"]),
        f"top{top_k}_overlap": len(set(top_old) & set(top_new)) / max(len(top_old), 1),
        "old_text_coverage": old["text_coverage"],
        "text_coverage_change": new["text_coverage"] - old["text_coverage"],
        "same_data": old["fingerprint"] == new["fingerprint"],
    })
    return out


def report_html(summary: dict) -> str:
    """The drift report page (``sidrec.ops.reports.drift_html``)."""
    from sidrec.ops.reports import drift_html

    return drift_html(summary)


def log_report(cfg: RunConfig, html: str, summary: dict) -> str:
    """Log the report as its own MLflow run (tag ``kind=drift``) in the dataset's experiment; returns the run id."""
    import mlflow

    from sidrec.ops.tracking import setup_mlflow

    exp = setup_mlflow(cfg)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(experiment_id=exp, run_name=f"drift-{cfg.name}",
                                                               tags={"kind": "drift", "config_name": cfg.name}) as run:
        (Path(tmp) / "drift_report.html").write_text(html)
        (Path(tmp) / "drift_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        mlflow.log_artifacts(tmp, "drift")
        mlflow.log_metrics({f"drift/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return run.info.run_id


# ------------------------------------------------------------------------------ new-item SIDs
def extend_index(bundle, item_ids: list[str], embeddings: np.ndarray):
    """A copy of ``bundle`` whose item index also covers ``item_ids`` (existing SIDs unchanged).

    ``embeddings[i]`` belongs to ``item_ids[i]``; rows of items already in the index are ignored.
    New items get codes from :func:`sidrec.index.quantize.assign_new` with the saved quantizer state.
    Returns ``(bundle, n_new)``.
    """
    from sidrec.index.quantize import assign_new

    new_rows = _new_rows(bundle, item_ids)
    if not new_rows:
        return bundle, 0
    x_new = np.asarray(embeddings, dtype=np.float32)[new_rows]
    codes, sizes = assign_new(bundle.state, bundle.items.codes, list(bundle.items.level_sizes), x_new)
    return _with_new_items(bundle, [item_ids[i] for i in new_rows], codes, sizes), len(new_rows)


def _hybrid_retrain_inputs(champ, features, cfg: RunConfig):
    """``(x, collab)`` for extending a hybrid champion: this run's collaborative vectors rotated into
    the champion's basis (:func:`sidrec.index.collab.align`), concatenated with the text embedding as the
    champion's quantizer expects. ``ValueError`` when the champion kept no collaborative vectors."""
    from sidrec.index.collab import align
    from sidrec.stages import index_inputs

    if champ.collab is None:
        raise ValueError("the champion's index has no collaborative vectors (it was built with index.embedding: text)")
    if features.item_collab is None:
        raise ValueError("this run's text features have no collaborative vectors")
    collab = align(champ.items.entity_ids[: len(champ.collab)], champ.collab, features.item_ids, features.item_collab)
    return index_inputs(features, cfg, collab=collab)[0], collab


def _new_rows(bundle, item_ids: list[str]) -> list[int]:
    """Positions in ``item_ids`` of items the bundle's index does not have yet."""
    return [i for i, e in enumerate(item_ids) if e not in bundle.items]


def _with_new_items(bundle, new_ids: list, codes: np.ndarray, sizes: list[int], **report_extra):
    """A copy of ``bundle`` with ``new_ids`` appended to its item index (existing rows untouched)."""
    from sidrec.artifacts import IndexBundle
    from sidrec.index.sid_index import SIDIndex

    old = bundle.items
    items = SIDIndex(entity_ids=list(old.entity_ids) + [str(e) for e in new_ids],
                     codes=np.vstack([old.codes, codes]), level_sizes=list(sizes), prefix=old.prefix)
    report = {**bundle.report, "index/new_items_assigned": len(new_ids), **report_extra, "index/reused": 1}
    return IndexBundle(items=items, state=bundle.state, report=report, users=bundle.users, usage_png=bundle.usage_png,
                       collab=bundle.collab)


def extend_index_by_generation(bundle, model, encoder, item_ids: list[str], texts: list[str], beams: int = 5,
                               dtype=None):
    """STORE option: new items get the SID the (champion) LLM generates from their text with the
    ``text_to_sid`` prompt, instead of the quantizer's assignment. Existing SIDs never change.

    The first ``M`` levels are decoded without a trie (any code combination); with a disambiguation level
    the next free extra index is appended, otherwise the best generated tuple that is still free is
    taken (``ValueError`` if none of the ``beams`` is). Returns ``(bundle, n_new)``."""
    import torch

    from sidrec.model.decode import generate_codes
    from sidrec.index.quantize import append_disambiguated
    from sidrec.data.tasks import EVAL_TEMPLATE, TEMPLATES

    old = bundle.items
    new_rows = _new_rows(bundle, item_ids)
    if not new_rows:
        return bundle, 0
    m, L = bundle.state.levels, old.num_levels
    prompts = [encoder.encode(TEMPLATES["text_to_sid"][EVAL_TEMPLATE].format(text=(texts[i] or "")[:200])) for i in new_rows]
    gen = generate_codes(model, prompts, m, beams, pad_id=encoder.pad_id, dtype=dtype or torch.float32)
    sizes = list(old.level_sizes)
    if L == m + 1:
        codes, sizes = append_disambiguated(old.codes, sizes, gen[:, 0])
    else:
        taken = {tuple(r) for r in old.codes.tolist()}
        codes = np.zeros((len(new_rows), L), dtype=np.int64)
        for j in range(len(new_rows)):
            free = [tuple(c) for c in gen[j].tolist() if tuple(c) not in taken]
            if not free:
                raise ValueError(f"item {item_ids[new_rows[j]]}: all {beams} generated SIDs are taken (no disambiguation level)")
            codes[j] = free[0]
            taken.add(free[0])
    return _with_new_items(bundle, [item_ids[i] for i in new_rows], codes, sizes,
                           **{"index/new_items_generated_by_llm": len(new_rows)}), len(new_rows)


def index_for_retrain(cfg: RunConfig, features) -> tuple:
    """The champion's index extended with new items, or a freshly fitted one. Returns ``(bundle, info)``."""
    from sidrec.artifacts import IndexBundle
    from sidrec.stages import build_index

    root = download_champion(cfg) if cfg.retrain.reuse_index and cfg.index.entities == "items" else None
    parts = champion_parts(root) if root is not None else {}
    if parts.get("index") is None:
        return build_index(features, cfg), {"source": "fresh", "reason": "no champion" if root is None else "champion has no index"}
    champ = IndexBundle.load(parts["index"])
    x, collab = features.item_embeddings, None
    if cfg.index.embedding == "hybrid":
        try:
            x, collab = _hybrid_retrain_inputs(champ, features, cfg)
        except ValueError as e:
            return build_index(features, cfg), {"source": "fresh", "reason": f"cannot place new items in the champion's index: {e}"}
    if champ.state.input_dim != x.shape[1]:
        return build_index(features, cfg), {"source": "fresh", "reason": f"index input dim {x.shape[1]} != champion quantizer {champ.state.input_dim}"}
    try:
        if cfg.retrain.new_item_sids == "llm" and parts.get("recommender") is not None:
            from sidrec.artifacts import load_model
            from sidrec.model.fusion import IndexEnsemble
            from sidrec.model.sid_model import Encoder
            from sidrec.runtime import compute_dtype

            model, tok, _ = load_model(parts["recommender"], cfg.model.backbone)
            if isinstance(model, IndexEnsemble):  # members on their own indexes: the champion's index is member 0's
                model = model.members[0]
            bundle, n_new = extend_index_by_generation(champ, model, Encoder(tok, model.vocab), features.item_ids,
                                                       features.item_texts, dtype=compute_dtype(cfg))
        else:
            bundle, n_new = extend_index(champ, features.item_ids, x)
    except ValueError as e:  # last level full under some prefix
        return build_index(features, cfg), {"source": "fresh", "reason": f"cannot extend the champion's index: {e}"}
    if collab is not None and n_new:  # the new items' collaborative vectors, in the order they were appended
        bundle.collab = np.vstack([champ.collab, collab[_new_rows(champ, features.item_ids)]])
    return bundle, {"source": "champion", "version": parts["version"], "new_items": n_new,
                    "new_item_sids": cfg.retrain.new_item_sids}


# ------------------------------------------------------------------------------ warm start
def warm_start_model(model, champion_recommender: Path, cfg: RunConfig) -> dict:
    """Load the champion's LoRA weights and the SID embedding rows of tokens both vocabularies share.

    Compatible = same backbone and LoRA shape, and every champion SID token exists in the new
    vocabulary (the index was extended, not re-fitted). Returns ``{"warm": bool, "reason": ...}``.
    """
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from sidrec.model.sid_model import SIDVocab

    d = Path(champion_recommender)
    if (d / "members").is_dir():  # a seed-ensemble champion: its first member (seed = the champion's seed)
        d = d / "members" / "0"
    meta = json.loads((d / "meta.json").read_text())
    if meta.get("backbone") != cfg.model.backbone:
        return {"warm": False, "reason": f"backbone {meta.get('backbone')} != {cfg.model.backbone}"}
    if meta.get("lora") and meta["lora"] != cfg.model.lora.model_dump():
        return {"warm": False, "reason": "LoRA config differs from the champion's"}
    old_vocab = SIDVocab.from_json(json.loads((d / "vocab.json").read_text()))
    new_ids = {t: i for i, t in enumerate(model.vocab.tokens)}
    missing = [t for t in old_vocab.tokens if t not in new_ids]
    if missing:
        return {"warm": False, "reason": f"{len(missing)} champion SID tokens are not in the new index (index re-fitted)"}
    adapter = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    res = set_peft_model_state_dict(model.lm, adapter)
    unexpected = list(getattr(res, "unexpected_keys", []) or [])
    if unexpected:
        return {"warm": False, "reason": f"adapter keys do not match ({unexpected[:2]})"}
    if meta.get("layers") != cfg.model.layers:
        return {"warm": False, "reason": f"model.layers {meta.get('layers')} != {cfg.model.layers}"}
    old_tensors = load_file(str(d / "sid_embeddings.safetensors"))
    old_sid = old_tensors["sid_embeddings"]
    if "sid_logit_scale" in old_tensors and old_tensors["sid_logit_scale"].shape == model.sid_logit_scale.shape:
        with torch.no_grad():
            model.sid_logit_scale.copy_(old_tensors["sid_logit_scale"])
    with torch.no_grad():
        rows_new = torch.tensor([new_ids[t] for t in old_vocab.tokens])
        model.sid_embeddings[rows_new] = old_sid.to(model.sid_embeddings.dtype)
    out = {"warm": True, "reason": "champion adapter + SID embeddings loaded", "copied_sid_rows": len(old_vocab.tokens)}
    if getattr(model, "item_head", None) is not None:
        out["item_head_warm"] = _warm_item_head(model.item_head, old_tensors, rows_new)
    return out


def _warm_item_head(head, old: dict, sid_rows_new) -> bool:
    """The champion's item head into the new model's: code rows by token, item rows by SID (a retrain keeps
    the champion's quantizer, so an item keeps its SID), its logit scale. False when the champion has none
    (the caller calibrates the new head instead)."""
    import torch

    if "item_head.rows" not in old:
        return False
    n_old = old["item_head.rows"].shape[0]
    rows_new = sid_rows_new[:n_old]  # the item levels come first in a SID vocabulary
    if int(rows_new.max()) >= head.rows.shape[0]:
        return False
    with torch.no_grad():
        head.rows[rows_new] = old["item_head.rows"].to(head.rows.dtype)
        new_rows = head.rows_of(old["item_head.codes"].to(head.codes.device))
        keep = new_rows >= 0
        head.item_rows[new_rows[keep]] = old["item_head.item_rows"][keep].to(head.item_rows.dtype)
        head.scale.fill_(float(old["item_head.scale"][0]))
    return True


def warm_finetune(instructions, bundle, cfg: RunConfig, out_dir: Path, log=None, ds=None, features=None):
    """``sidrec.stages.finetune`` that starts from the champion when compatible (meta ``warm_start``);
    ``log(step, metrics)`` as in ``stages.finetune``; ``ds`` and ``features``: what an ensemble with
    ``train.member_index: own`` builds its other members' indexes from."""
    from sidrec.artifacts import TrainedRecommender
    from sidrec.model.sid_model import save_recommender
    from sidrec.runtime import compute_dtype, progress_enabled, seed_everything, set_threads
    from sidrec.stages import recording_log, build_model, calibrate, recommender_meta
    from sidrec.training.loop import train

    if cfg.train.members > 1:  # each member starts from its own seed; a warm start is one model's
        from sidrec.stages import finetune_members

        return finetune_members(instructions, bundle, cfg, out_dir, log, ds, features=features,
                                warm_start={"warm": False, "reason": "train.members > 1: a seed ensemble trains fresh"})
    set_threads(cfg)
    seed_everything(cfg.seed, cfg.train.deterministic)
    model, tok, encoder = build_model(cfg, bundle, teacher_ds=ds)
    info = {"warm": False, "reason": "retrain.warm_start is off"}
    if cfg.retrain.warm_start:
        root = download_champion(cfg)
        if root is None:
            info = {"warm": False, "reason": "no champion"}
        else:
            parts = champion_parts(root)
            info = warm_start_model(model, parts["recommender"], cfg) if parts["recommender"] else {"warm": False, "reason": "champion has no recommender"}
            info["from_version"] = parts["version"] if info["warm"] else ""
    if not info["warm"]:  # a fresh model: calibrate its SID head (a warm one keeps the champion's)
        calibrate(model, encoder, instructions.part("train"), cfg)
    elif not info.get("item_head_warm"):  # a new item head only (none: nothing to do)
        calibrate(model, encoder, instructions.part("train"), cfg, sid=False)
    losses, _log = recording_log(log)
    res = train(model, encoder, instructions.part("train"), cfg.train, cfg.seed, compute_dtype(cfg), _log, progress_enabled())
    meta = recommender_meta(cfg, model, res.summary(), losses, warm_start=info)
    save_recommender(model, tok, out_dir, meta)
    return TrainedRecommender(path=out_dir, meta=meta)
