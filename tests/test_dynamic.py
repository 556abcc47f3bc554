"""The dynamic index (sidrec.index.dynamic): it starts as the static index, learns in alternating phases with
churn-bounded refreshes, the recommendation loss reaches the codebooks only in tokenizer phases, training
targets follow the current index, and a crashed dynamic run resumes to exactly the uninterrupted result."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from sidrec.artifacts import EntityFeatures
from sidrec.index.collab import cooccurrence_vectors
from sidrec.config import IndexConfig, parse_config
from sidrec.data.dataset import load_dataset
from sidrec.index.dynamic import LearnedQuantizer, phase_plan, reassign
from sidrec.index.sid_index import SIDIndex
from sidrec.index.quantize import QuantizerState, quantize


def _cfg(ml100k_dir, tmp=None, **over):
    d = {"seed": 0, "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 40, "kcore": 3},
         "index": {"mode": "dynamic", "entities": "items+users", "levels": 2, "codebook_size": 8, "kmeans_iters": 5,
                   "dynamic": {"cycles": 2, "tokenizer_share": 0.25, "final_share": 0.25, "tokenizer_lr": 0.05,
                               "churn_margin": 0.0, "entity_batch": 8, "hidden_dim": 16}},
         "tasks": {"seqrec": 1.0, "text_to_sid": 0.3, "sid_to_text": 0.0, "titles_to_sid": 0.0, "user_pred": 0.5,
                   "user_to_text": 0.0, "text_to_user": 0.2, "prompt_history": 4},
         "model": {"backbone": "tiny", "dtype": "float32", "lora": {"r": 2}},
         "train": {"steps": 24, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "threads": 1,
                   **({"checkpoint_dir": str(tmp)} if tmp else {})}}
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_config(d)


def _features(ds) -> EntityFeatures:
    rng = np.random.default_rng(0)
    users = list(ds.train_sequences().keys())
    return EntityFeatures(item_ids=ds.items["item_id"].tolist(), item_texts=[""] * len(ds.items),
                          item_embeddings=rng.normal(size=(len(ds.items), 24)).astype("float32"),
                          user_ids=users, user_texts=[""] * len(users),
                          user_embeddings=rng.normal(size=(len(users), 24)).astype("float32"))


@pytest.fixture(scope="module")
def ml(ml100k_dir):
    cfg = _cfg(ml100k_dir)
    return cfg, load_dataset(cfg.data)


@pytest.fixture(scope="module")
def collab_x(ml100k_dir):
    """Real co-occurrence vectors (training split) of a MovieLens slice: what a hybrid index quantizes."""
    ds = load_dataset(parse_config({"data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 200,
                                             "kcore": 5}}).data)
    return cooccurrence_vectors(ds.train_sequences().values(), ds.items["item_id"].tolist(), 16, 5, 0)


@pytest.mark.parametrize("collisions", ["nearest_free", "extra_level"])
def test_learned_quantizer_starts_as_the_static_index(collab_x, collisions, tmp_path):
    res = quantize(collab_x, IndexConfig(levels=2, codebook_size=32, collisions=collisions, kmeans_iters=10), seed=0)
    lq = LearnedQuantizer(res.state, collab_x, hidden_dim=16, seed=0)
    codes, _ = lq.greedy(lq.encode())
    assert np.array_equal(codes.numpy(), res.state.assign(collab_x))  # step 0: the static assignment
    index = SIDIndex(entity_ids=[str(i) for i in range(len(collab_x))], codes=res.codes, level_sizes=res.level_sizes)
    new, stats = reassign(lq, index, max_churn=0.1, margin=0.05)
    assert stats["churn"] == 0.0 and np.array_equal(new.codes, res.codes)  # a refresh before training moves nothing
    assert stats["collision_rate_raw"] == pytest.approx(res.raw_collision_rate)
    for k in ("overfull", "in_room", "prefix_cells", "largest_cell"):  # and where they come from, as the static report says
        assert stats[f"raw_{k}"] == pytest.approx(res.stats[f"raw_{k}"]), k
    # the saved learned state (residual MLPs) assigns like the static state until it has trained
    lq.state().save(tmp_path / "q")
    loaded = QuantizerState.load(tmp_path / "q")
    assert loaded.residual and np.array_equal(loaded.assign(collab_x), res.state.assign(collab_x))


def test_a_balanced_dynamic_index_starts_balanced_and_refits_its_prices_as_the_codebooks_move(collab_x, tmp_path):
    """index.balance: last with the dynamic index: step 0 is the balanced static assignment, a refresh of an
    unmoved quantizer keeps its prices and codes, and once the encoder moves the refitted prices even out the
    last level again; the saved state assigns with them."""
    kw = dict(levels=2, codebook_size=32, collisions="nearest_free", kmeans_iters=10)
    plain = quantize(collab_x, IndexConfig(**kw), seed=0)
    res = quantize(collab_x, IndexConfig(**kw, balance="last"), seed=0)
    assert res.raw_collision_rate < plain.raw_collision_rate  # the prices do something on this catalog
    lq = LearnedQuantizer(res.state, collab_x, hidden_dim=16, seed=0)
    assert lq.balanced and not LearnedQuantizer(plain.state, collab_x, hidden_dim=16, seed=0).balanced
    codes, _ = lq.greedy(lq.encode())
    assert np.array_equal(codes.numpy(), res.state.assign(collab_x))  # step 0: the balanced static assignment
    index = SIDIndex(entity_ids=[str(i) for i in range(len(collab_x))], codes=res.codes, level_sizes=res.level_sizes)
    new, stats = reassign(lq, index, max_churn=0.1, margin=0.05)
    assert stats["churn"] == 0.0 and np.array_equal(new.codes, res.codes)
    assert stats["collision_rate_raw"] == pytest.approx(res.raw_collision_rate)
    assert torch.allclose(lq.price(1), torch.from_numpy(res.state.prices[1]), atol=1e-5)  # refit = the static prices

    def spread(codes):  # the largest last-level code's share of the catalog
        return np.bincount(codes[:, -1], minlength=32).max() / len(codes)

    with torch.no_grad():  # the encoder moves: the start prices no longer balance the last level
        torch.manual_seed(0)
        lq.encoder.layers[-1].weight.normal_(0, 0.5)
        stale, _ = lq.greedy(lq.encode())
    before = lq.price(1).clone()
    reassign(lq, index, max_churn=0.1, margin=0.05)
    assert not torch.equal(lq.price(1), before)
    with torch.no_grad():
        refit, _ = lq.greedy(lq.encode())
    assert spread(refit.numpy()) < spread(stale.numpy())
    lq.state().save(tmp_path / "q")  # the saved state places new entities by the refitted prices
    assert np.array_equal(QuantizerState.load(tmp_path / "q").assign(collab_x), refit.numpy())


@pytest.mark.parametrize("collisions", ["nearest_free", "extra_level"])
def test_reassign_bounds_churn_moves_the_largest_gains_and_stays_unique(collab_x, collisions):
    res = quantize(collab_x, IndexConfig(levels=2, codebook_size=32, collisions=collisions, kmeans_iters=10), seed=0)
    lq = LearnedQuantizer(res.state, collab_x, hidden_dim=16, seed=0)
    with torch.no_grad():  # an encoder that has moved: most entities would now prefer another code
        torch.manual_seed(0)
        lq.encoder.layers[-1].weight.normal_(0, 0.5)
    index = SIDIndex(entity_ids=[str(i) for i in range(len(collab_x))], codes=res.codes, level_sizes=res.level_sizes)
    n = len(collab_x)
    new, stats = reassign(lq, index, max_churn=0.1, margin=0.05)
    moved = np.nonzero((new.codes != index.codes).any(1))[0]
    assert stats["eligible"] > 0.1  # more entities want to move than may
    assert 0 < len(moved) <= int(np.floor(0.1 * n)) and stats["churn"] == len(moved) / n
    if collisions == "extra_level":  # free slots under every code: the whole budget is used
        assert len(moved) == int(np.floor(0.1 * n))
    assert len({tuple(c) for c in new.codes.tolist()}) == n  # still unique
    with torch.no_grad():
        z = lq.encode()
        err = lambda codes: ((z - lq.quantized(torch.from_numpy(codes))) ** 2).sum(1).numpy()  # noqa: E731
        e_old, e_new = err(index.codes), err(new.codes)
    assert (e_new[moved] < 0.95 * e_old[moved]).all()  # each move clears the margin
    unmoved = np.setdiff1d(np.arange(n), moved)
    assert (e_new[unmoved] == e_old[unmoved]).all()
    # a larger budget moves at least as many (more where free codes allow), never beyond it
    new2, stats2 = reassign(lq, index, max_churn=0.5, margin=0.05)
    assert len(moved) <= stats2["churn"] * n <= np.floor(0.5 * n)
    if collisions == "extra_level":
        assert len(moved) < stats2["churn"] * n


def test_phase_plan_alternates_and_ends_on_a_frozen_index():
    plan = phase_plan(100, cycles=2, tokenizer_share=0.1, final_share=0.4)
    assert [p.kind for p in plan] == ["rec", "tok", "rec", "tok", "final"]
    assert plan[0].start == 0 and all(a.end == b.start for a, b in zip(plan, plan[1:]))
    # the recommender phases train exactly the static budget; the tokenizer phases come on top
    assert sum(p.end - p.start for p in plan if p.kind != "tok") == 100
    assert sum(p.end - p.start for p in plan if p.kind == "tok") == 10 and plan[-1].end - plan[-1].start == 40
    with pytest.raises(ValueError, match="too few"):
        phase_plan(4, cycles=3, tokenizer_share=0.1, final_share=0.4)
    with pytest.raises(Exception, match="final_share"):
        parse_config({"index": {"mode": "dynamic", "dynamic": {"final_share": 1.0}}})


def _pieces(cfg, ds):
    """The dynamic stage's objects before training (as stages.dynamic_finetune builds them)."""
    from sidrec.index.dynamic import DynamicIndexHooks, Family, LearnedIndexModel
    from sidrec.stages import _static_index, build_model, index_inputs, instruct, render_instructions

    feats = _features(ds)
    static, user_state = _static_index(feats, cfg)
    instr = instruct(ds, static, cfg)
    model, tok, encoder = build_model(cfg, static, ds)
    fams = [Family("items", LearnedQuantizer(static.state, index_inputs(feats, cfg)[0], 16, 0), static.items, 0),
            Family("users", LearnedQuantizer(user_state, feats.user_embeddings, 16, 1), static.users, static.items.num_levels)]
    table0 = model.sid_embeddings.detach().clone()
    learned = LearnedIndexModel(model, fams, 0)
    hooks = DynamicIndexHooks(learned, cfg.index.dynamic, 24, cfg.train.lr, 0,
                              lambda ix: render_instructions(ds, ix["items"], ix.get("users"), cfg), instr.rows)
    return learned, encoder, instr, hooks, table0


def test_recommendation_gradient_reaches_codebooks_in_tokenizer_phases_only(ml):
    from sidrec.training.loop import collate, encode_rows, target_loss

    cfg, ds = ml
    learned, encoder, instr, hooks, table0 = _pieces(cfg, ds)
    assert torch.equal(learned.sid_table(), table0)  # step 0: the static run's SID table
    rows = instr.part("train").head(8)
    e = encode_rows(encoder, rows)
    lora = [p for n, p in learned.lm.named_parameters() if "lora" in n]

    def backward(kind):
        hooks._set_phase(learned, kind)
        for p in [learned.sid_embeddings, *lora, *learned.quantizers.parameters(), *learned.proj.parameters()]:
            p.grad = None
        ids, mask, tgt = collate(e, np.arange(len(rows)), encoder.pad_id)
        h, _ = learned.hidden(ids, attention_mask=mask)
        loss, _ = target_loss(learned, h, ids, tgt)  # the recommendation loss only
        loss.backward()

    backward("tok")
    for f, q in zip(learned.families, learned.quantizers):
        for lv, cb in enumerate(q.codebooks):
            assert cb.grad is not None and cb.grad.abs().sum() > 0, f"no recommendation gradient in {f.name} codebook {lv}"
    assert learned.sid_embeddings.grad is None and all(p.grad is None for p in lora)  # the LLM is frozen
    backward("rec")
    assert all(cb.grad is None for q in learned.quantizers for cb in q.codebooks)  # the index is frozen
    assert learned.sid_embeddings.grad.abs().sum() > 0 and any(p.grad is not None for p in lora)
    # folding bakes a moved codebook's offset into the saved table, once
    with torch.no_grad():
        learned.quantizers[0].codebooks[0].add_(0.5)
    learned.freeze_offsets(True)
    live = learned.sid_table().detach().clone()
    assert not torch.equal(live, table0)
    assert torch.equal(learned.folded().sid_embeddings, live) and torch.equal(learned.sid_table(), live)
    assert torch.equal(learned.folded().sid_embeddings, live)


def test_codebooks_train_at_their_own_learning_rate(ml):
    """index.dynamic.codeword_lr: the codebooks of every family train in a group of their own at it (default: a tenth
    of tokenizer_lr), the rest of the quantizer at tokenizer_lr, every parameter in exactly one group."""
    cfg, ds = ml
    learned, _, _, hooks, _ = _pieces(cfg, ds)
    books = {id(cb) for q in learned.quantizers for cb in q.codebooks}
    every = {id(p) for _, p in hooks.parameters(learned)}

    def check(groups, lr):
        (own,) = [g for g in groups if books & {id(p) for p in g["params"]}]
        assert {id(p) for p in own["params"]} == books and own["lr"] == lr
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) and set(ids) == every
        index = [id(p) for _, p in hooks._index_params(learned) if id(p) not in books]
        (rest,) = [g for g in groups if set(index) & {id(p) for p in g["params"]}]
        assert rest["lr"] == hooks.tokenizer_lr and set(index) == {id(p) for p in rest["params"]}

    assert cfg.index.dynamic.codeword_lr is None
    check(hooks.param_groups(learned, cfg.train), hooks.tokenizer_lr / 10)
    assert parse_config({"index": {"mode": "dynamic", "dynamic": {"codeword_lr": 1e-5}}}).index.dynamic.codeword_lr == 1e-5
    asked = cfg.model_copy(update={"index": cfg.index.model_copy(update={
        "dynamic": cfg.index.dynamic.model_copy(update={"codeword_lr": 1e-5})})})
    learned, _, _, hooks, _ = _pieces(asked, ds)
    books = {id(cb) for q in learned.quantizers for cb in q.codebooks}
    every = {id(p) for _, p in hooks.parameters(learned)}
    check(hooks.param_groups(learned, cfg.train), 1e-5)


def test_the_checkpoint_key_follows_the_dynamic_settings(ml):
    """A dynamic run resumes only under the same index settings, learning rates resolved (a checkpoint written before
    the codebooks had a group of their own has a key without them: never resumed into the new layout); the static
    hooks add nothing to theirs."""
    from sidrec.stages import compute_dtype
    from sidrec.training.loop import TrainHooks, run_key

    cfg, ds = ml
    learned, _, _, hooks, _ = _pieces(cfg, ds)
    rows = hooks.part("train")

    def key(settings):
        return run_key(learned, rows, cfg.train, cfg.seed, compute_dtype(cfg), hooks.parameters(learned), settings)

    base = key(hooks.settings())
    assert hooks.settings()["dynamic"]["tokenizer_lr"] == hooks.tokenizer_lr
    assert key(hooks.settings()) == base
    hooks.codeword_lr = 1e-5
    assert key(hooks.settings()) != base
    assert TrainHooks().settings() is None and key(None) != base


@pytest.mark.parametrize("keep", [True, False])
def test_a_refresh_keeps_the_item_heads_vectors_when_asked(ml, keep):
    """index.dynamic.keep_item_vectors: at a refresh the items that moved keep their item-head vectors (their own rows
    absorb the change of their code rows), so the head scores every item as before; without it they change."""
    cfg, ds = ml
    cfg = cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"item_head": 1.0}),
        "index": cfg.index.model_copy(update={"dynamic": cfg.index.dynamic.model_copy(update={"keep_item_vectors": keep})})})
    learned, _, _, hooks, _ = _pieces(cfg, ds)
    head = learned.item_head
    with torch.no_grad():
        head.rows.normal_(generator=torch.Generator().manual_seed(3))
        for cb in learned.quantizers[0].codebooks:  # the codebooks moved in a tokenizer phase
            cb.add_(0.3 * torch.randn(cb.shape, generator=torch.Generator().manual_seed(4)))
    before_codes, before = head.codes.clone(), head.item_vectors().detach().clone()
    tok = next(ph for ph in hooks.phases if ph.kind == "tok")
    hooks._set_phase(learned, "tok")
    assert hooks.before_step(tok.end, learned) is not None  # the refresh
    moved = (head.codes != before_codes).any(1)
    assert moved.any() and torch.equal(head.codes, torch.as_tensor(hooks.families[0].index.codes))
    after = head.item_vectors().detach()
    assert torch.equal(after[~moved], before[~moved])
    assert torch.allclose(after[moved], before[moved], atol=1e-5) == keep


def _run(cfg, ds, out, log=None):
    from sidrec.stages import dynamic_finetune

    return dynamic_finetune(ds, _features(ds), cfg, out, log=log)


def test_dynamic_finetune_refreshes_after_tokenizer_phases_and_targets_follow_the_index(ml, tmp_path):
    cfg, ds = ml
    cfg = _cfg(cfg.data.path, train={"eval_every": 4, "select_users": 10}, model={"item_head": 1.0})
    logged = []
    rec, bundle, instr = _run(cfg, ds, tmp_path / "m", log=lambda s, m: logged.append((s, m)))
    dlog = rec.meta["dynamic_log"]
    # 24 recommender steps + 6 tokenizer steps: codes recomputed at the end of each tokenizer phase
    assert rec.meta["train"]["dynamic/phases"] == "rec:0-9 tok:9-12 rec:12-21 tok:21-24 final:24-30"
    assert [(e["step"], e["frozen"]) for e in dlog] == [(12, 0), (24, 1)]
    assert rec.meta["train"]["train/steps"] == 30 and rec.meta["train"]["dynamic/recommender_steps"] == 24
    for e in dlog:
        for fam in ("items", "users"):
            assert 0.0 <= e[f"churn/{fam}"] <= 0.1 + 1e-9
    assert sum(e["churn/items"] + e["churn/users"] for e in dlog) > 0  # the index did change
    assert any("dynamic/churn/items" in m for _, m in logged)
    assert any("train/token_align/items" in m and "train/recon/users" in m for _, m in logged)
    # model selection only on the frozen index (the final phase)
    assert rec.meta["select_curve"] and all(s > 24 for s, _ in rec.meta["select_curve"])
    # final indices unique; training, valid and test rows rendered on them
    for idx in (bundle.items, bundle.users):
        assert len({tuple(c) for c in idx.codes.tolist()}) == len(idx.codes)
    rows = instr.rows
    for r in rows[rows.task.isin(["seqrec", "text_to_sid"])].itertuples():
        if r.task == "seqrec" and r.split == "train":  # a window: the SIDs of items 2..n, the last one the target item's
            assert r.target.endswith(bundle.items.sid_of(r.target_item))
            toks, L = re.findall(r"<[a-z]_\d+>", r.target), bundle.items.num_levels
            assert len(toks) % L == 0
            assert all(bundle.items.parse("".join(toks[i:i + L])) is not None for i in range(0, len(toks), L))
        else:
            assert r.target == bundle.items.sid_of(r.target_item)
    for r in rows[rows.split == "test"].itertuples():
        assert r.prompt.startswith(bundle.users.sid_of(r.user_id))
    assert bundle.state.residual and np.isfinite(rec.meta["train"]["train/final_loss"])
    # the item head followed the refreshes: the saved model's head scores the items by their final SIDs
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "m" / "sid_embeddings.safetensors"))
    assert np.array_equal(saved["item_head.codes"].numpy(), bundle.items.codes)
    assert bundle.report["index/changed_vs_static"] > 0  # so the head was re-pointed, not left as it started
    assert saved["item_head.item_rows"].abs().sum() > 0  # and it trained


def _model_tensors(path):
    from safetensors.torch import load_file

    out = {f"sid/{k}": v for k, v in load_file(str(path / "sid_embeddings.safetensors")).items()}
    out.update({f"lora/{k}": v for k, v in load_file(str(path / "adapter" / "adapter_model.safetensors")).items()})
    return out


@pytest.mark.parametrize("balance,item_head", [("none", 0.0), ("last", 1.0)])
def test_a_crashed_dynamic_run_resumes_to_the_uninterrupted_result(ml, tmp_path, balance, item_head):
    cfg, ds = ml

    class Crash(Exception):
        pass

    def crash_at_17(step, m):
        if step == 17 and "train/loss" in m:
            raise Crash

    ck = tmp_path / "ck"
    resumable = _cfg(cfg.data.path, tmp=ck, train={"checkpoint_every": 4}, index={"balance": balance},
                     model={"item_head": item_head})
    with pytest.raises(Crash):  # mid-way through the second recommender phase, after the refresh at step 12
        _run(resumable, ds, tmp_path / "crashed", log=crash_at_17)
    assert not (tmp_path / "crashed" / "meta.json").exists()
    assert [p.name for p in ck.glob("*/ckpt-*")] == ["ckpt-0000016"]
    resumed, rb, _ = _run(resumable, ds, tmp_path / "resumed")
    assert resumed.meta["train"]["train/resumed_from_step"] == 16
    fresh, fb, _ = _run(_cfg(cfg.data.path, tmp=tmp_path / "ck2", train={"checkpoint_every": 4}, index={"balance": balance},
                             model={"item_head": item_head}), ds, tmp_path / "fresh")
    assert fresh.meta["train"]["train/resumed_from_step"] == 0
    a, b = _model_tensors(tmp_path / "resumed"), _model_tensors(tmp_path / "fresh")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert np.array_equal(rb.items.codes, fb.items.codes) and np.array_equal(rb.users.codes, fb.users.codes)
    assert resumed.meta["dynamic_log"] == fresh.meta["dynamic_log"]
    assert resumed.meta["loss_curve"] == fresh.meta["loss_curve"]


def test_user_sids_can_stay_out_of_the_prompt(ml):
    """tasks.user_sid_in_prompt false: a dual index keeps user SIDs in the user tasks only."""
    from sidrec.stages import _static_index, render_instructions

    cfg, ds = ml
    static, _ = _static_index(_features(ds), cfg)
    on = render_instructions(ds, static.items, static.users, cfg)
    off = render_instructions(ds, static.items, static.users,
                              _cfg(cfg.data.path, tasks={"user_sid_in_prompt": False}))
    rec = lambda rows: rows[rows.task == "seqrec"]  # noqa: E731
    assert rec(on).prompt.str.contains("<u_").all() and not rec(off).prompt.str.contains("<u_").any()
    users = off[off.task == "user_pred"]
    assert len(users) and users.target.str.contains("<u_").all()
    assert len(on) == len(off)


def test_a_prompt_can_carry_only_the_head_of_the_users_sid(ml):
    """tasks.user_prompt_levels 1: a recommendation prompt starts with the user's first code only (shared by a group
    of users, so it cannot name one), while the user tasks still target the whole SID."""
    import re

    from sidrec.stages import _static_index, render_instructions

    cfg, ds = ml
    static, _ = _static_index(_features(ds), cfg)
    full = render_instructions(ds, static.items, static.users, cfg)
    head = render_instructions(ds, static.items, static.users, _cfg(cfg.data.path, tasks={"user_prompt_levels": 1}))
    users = static.users
    first = {e: users.token(0, int(users.codes[i][0])) for i, e in enumerate(users.entity_ids)}
    rec = head[head.task == "seqrec"]
    lead = rec.prompt.map(lambda p: re.match(r"((?:<u_[^>]*>)*)", p).group(1))
    assert (lead == rec.user_id.map(first)).all()
    assert users.num_levels > 1 and lead.map(lambda t: t.count("<u_")).eq(1).all()
    assert rec.user_id.nunique() > lead.nunique()  # groups of users share a prompt head
    full_rec = full[full.task == "seqrec"]
    assert full_rec.prompt.map(lambda p: re.match(r"((?:<u_[^>]*>)*)", p).group(1).count("<u_")).eq(users.num_levels).all()
    assert (rec.target.to_numpy() == full_rec.target.to_numpy()).all()  # the items' side is unchanged
    tasks = head[head.task == "user_pred"]
    assert len(tasks) and (tasks.target.to_numpy() == full[full.task == "user_pred"].target.to_numpy()).all()


def test_a_dual_model_is_served_with_the_prompts_it_was_trained_and_tested_on(ml, tmp_path):
    """Serving a dual index whose prompts start with the user's SID (here its first code, tasks.user_prompt_levels 1):
    a test user's history with their user id renders exactly the test row's prompt; without a user id, or for a user
    the index does not know, the same prompt without the head; recommend() takes one user id per history."""
    from sidrec.errors import DataError
    from sidrec.ops.serving import Recommender

    cfg, ds = ml
    rec, bundle, instr = _run(_cfg(cfg.data.path, tasks={"user_prompt_levels": 1}), ds, tmp_path / "m")
    bundle.save(tmp_path / "index")
    ds.items[["item_id", "title"]].to_csv(tmp_path / "items.csv", index=False)
    served = Recommender(rec.path, tmp_path / "index", tmp_path / "items.csv")
    assert served.prompt_format.user_levels == 1
    test = instr.part("test").head(6)
    for row in test.itertuples():
        head = served.prompt_format.user_head(served.users, row.user_id)
        assert head.count("<u_") == 1 and row.prompt.startswith(head)
        assert served.prompt_text(list(row.seen), row.user_id) == row.prompt
        assert served.prompt_text(list(row.seen)) == served.prompt_text(list(row.seen), "no-such-user") == row.prompt[len(head):]
    out = served.recommend([list(h) for h in test.seen[:3]], 4, list(test.user_id[:3]))
    assert [len(o) for o in out] == [4, 4, 4]
    with pytest.raises(DataError, match="user ids for"):
        served.recommend([list(h) for h in test.seen[:3]], 4, list(test.user_id[:2]))


def test_the_users_learned_quantizer_starts_from_their_hybrid_index(ml):
    """A dual index on a hybrid index (index.hybrid.users): the users' learned quantizer reads the same [text | mean
    collaborative vector of the user's training items] the static users' index was fitted on, so step 0 assigns
    exactly as it did, and its quantization error is on the items' scale (the weighted columns carry unit variance
    in all), not the text embedding's column count."""
    from sidrec.stages import _static_index, collab_features, user_collab_features, user_index_inputs

    cfg, ds = ml
    cfg = _cfg(cfg.data.path, index={"embedding": "hybrid", "hybrid": {"dim": 8, "window": 3}})
    feats = _features(ds)
    item_collab = collab_features(ds, cfg)
    feats = dataclasses.replace(feats, item_collab=item_collab,
                                user_collab=user_collab_features(ds, feats.user_ids, item_collab))
    static, user_state = _static_index(feats, cfg)
    xu, _ = user_index_inputs(feats, cfg)
    lq = LearnedQuantizer(user_state, xu, hidden_dim=16, seed=1)
    z = lq.encode().detach()
    codes, _ = lq.greedy(z)
    assert np.array_equal(codes.numpy(), user_state.assign(xu))
    err = float(((z - lq.quantized(codes).detach()) ** 2).sum(1).mean())
    assert 0.0 < err < 1.0
    text_only = _cfg(cfg.data.path, index={"embedding": "hybrid", "hybrid": {"dim": 8, "window": 3, "users": False}})
    _, text_state = _static_index(feats, text_only)
    lt = LearnedQuantizer(text_state, feats.user_embeddings, hidden_dim=16, seed=1)
    zt = lt.encode().detach()
    assert float(((zt - lt.quantized(lt.greedy(zt)[0]).detach()) ** 2).sum(1).mean()) > 5.0  # ~24 standardised text columns


def test_the_users_sid_rows_start_from_their_texts(ml):
    """model.sid_init text on a dual index: the users' SID rows start, like the items', as the centred mean text
    embedding of the users carrying each code at the vocabulary's spread; sid_init_users false leaves them random.
    The items' rows are the same either way."""
    from sidrec.stages import _static_index, build_model

    cfg, ds = ml
    static, _ = _static_index(_features(ds), cfg)
    on, _, _ = build_model(cfg, static, ds, device="cpu")
    off, _, _ = build_model(_cfg(cfg.data.path, model={"sid_init_users": False}), static, ds, device="cpu")
    vocab = on.vocab
    L = static.items.num_levels
    items = slice(0, vocab.level_offsets[L])
    assert torch.equal(on.sid_embeddings[items], off.sid_embeddings[items])
    base = on.base_embeddings().weight.detach().float()
    mu, spread = base.mean(0), (base - base.mean(0)).norm(dim=1).mean()
    used = np.unique(static.users.codes[:, 0])
    rows_on = on.sid_embeddings.detach()[vocab.level_slice(L)][used]
    rows_off = off.sid_embeddings.detach()[vocab.level_slice(L)][used]
    assert not torch.allclose(rows_on, rows_off)
    assert torch.isclose((rows_on - mu).norm(dim=1).pow(2).mean().sqrt(), spread, rtol=1e-3)
    assert on.sid_init_share > off.sid_init_share
