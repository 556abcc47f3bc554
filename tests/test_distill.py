"""Distilling the run's SASRec into the item head (sidrec.model.distill, ``model.item_head_distill``) on real
MovieLens-100k windows and a tiny Llama: the teacher reads each window's items before every target, the term is zero
when the student already agrees and positive otherwise, it applies in training only, it is never saved, and the
pipeline's teacher is the run's own SASRec with its items mapped to the head's rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sidrec.data.tasks import train_windows
from sidrec.model.distill import ItemTeacher, distill_loss, window_items
from sidrec.model.item_head import item_head_loss, item_targets

from test_item_head import H, _model, rows  # noqa: F401  (pytest fixture: the slice's window rows)
from test_tasks_text import index, ml  # noqa: F401  (pytest fixtures: a real 120-user slice and its index)


class _EchoTeacher(torch.nn.Module):
    """Scores 5.0 for the item read at each position (its own id - 1), 0 elsewhere, and records what it was fed."""

    def __init__(self, n_items: int, max_len: int = 50):
        super().__init__()
        self.n_items, self.max_len, self.seen = n_items, max_len, []
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, seq):
        self.seen.append(seq.clone())
        out = torch.zeros(*seq.shape, self.n_items)
        real = seq > 0
        out[real.nonzero(as_tuple=True) + ((seq[real] - 1),)] = 5.0
        return out


def _batch(index, rows, n=10):
    from sidrec.training.loop import collate, encode_rows

    model, enc_, tok = _model(index)
    tr = rows[(rows["split"] == "train") & (rows["task"] == "seqrec")].head(n).reset_index(drop=True)
    enc = encode_rows(enc_, tr)
    ids, mask, tgt = collate(enc, np.arange(len(tr)), enc_.pad_id)
    return model, tok, ids, mask, tgt


def test_teacher_reads_each_windows_items_before_every_target(ml, index, rows):
    """The teacher is fed every window's items in order (right-aligned, shifted ids, through the row -> teacher-index
    map), and the logits a target gets are the teacher's after the items before it, in the head's row order."""
    model, _, ids, _, tgt = _batch(index, rows)
    head, base = model.item_head, model.vocab.base_vocab
    n = len(index.entity_ids)
    perm = np.random.default_rng(3).permutation(n)  # head row r is the teacher's item perm[r]
    echo = _EchoTeacher(n)
    teacher = ItemTeacher(echo, perm, weight=1.0)
    items, lengths, _ = window_items(head, ids, base)
    row_of = {e: i for i, e in enumerate(index.entity_ids)}
    wins = train_windows(ml, H).head(10)
    for j, its in enumerate(wins["items"]):
        assert items[j, : lengths[j]].tolist() == [row_of[x] for x in its]
    pos, targets = item_targets(ids, tgt[:, 1:], base, head)
    _, _, rank = window_items(head, ids, base)
    jj = rank[pos[:, 0], pos[:, 1] + 1]
    assert (jj >= 1).all()  # every target (items 2..n) has a history
    assert (items[pos[:, 0], jj] == targets).all()
    t, ok = teacher.logits(items, lengths, pos[:, 0], jj - 1)
    fed = echo.seen[-1]
    for j in range(len(wins)):
        k = int(lengths[j])
        assert fed[j, -k:].tolist() == (perm[items[j, :k].numpy()] + 1).tolist() and not fed[j, :-k].any()
    # the echo teacher's peak after items[:c + 1] is the last of them, in head-row order
    assert ok.all() and t.shape == (len(pos), n)
    assert torch.equal(t.argmax(-1), items[pos[:, 0], jj - 1])


def test_a_short_teacher_reads_each_windows_last_items_only(ml, index, rows):
    """A teacher with ``max_len`` 3 is fed each window's last 3 items; a target whose previous item lies before them
    gets no teacher score (ok False, no term), every other one the teacher's score after its previous item."""
    model, _, ids, _, tgt = _batch(index, rows)
    head, base = model.item_head, model.vocab.base_vocab
    n = len(index.entity_ids)
    echo = _EchoTeacher(n, max_len=3)
    teacher = ItemTeacher(echo, np.arange(n), weight=1.0)
    items, lengths, rank = window_items(head, ids, base)
    pos, _ = item_targets(ids, tgt[:, 1:], base, head)
    jj = rank[pos[:, 0], pos[:, 1] + 1]
    t, ok = teacher.logits(items, lengths, pos[:, 0], jj - 1)
    fed = echo.seen[-1]
    assert fed.shape[1] == 3
    for b in range(len(lengths)):
        k = int(lengths[b])
        kk = min(k, 3)
        assert fed[b, 3 - kk:].tolist() == (items[b, k - kk:k] + 1).tolist() and not fed[b, :3 - kk].any()
    assert torch.equal(ok, jj - 1 >= lengths[pos[:, 0]] - 3)
    assert 0 < int(ok.sum()) < len(ok) and t.shape == (int(ok.sum()), n)
    assert torch.equal(t.argmax(-1), items[pos[ok, 0], jj[ok] - 1])
    # the term reads only the targets the teacher scored: zero when the student agrees there, whatever elsewhere
    student = torch.randn(len(pos), n, generator=torch.Generator().manual_seed(2))
    student[ok] = t
    assert float(distill_loss(teacher, head, ids, pos, student, base)) == pytest.approx(0.0, abs=1e-5)
    student[ok] = t.flip(-1)
    assert float(distill_loss(teacher, head, ids, pos, student, base)) > 0.01


def test_a_teacher_must_say_its_catalog_size():
    with pytest.raises(ValueError, match="n_items"):
        ItemTeacher(torch.nn.Linear(2, 2), np.arange(2), weight=1.0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ItemTeacher(_EchoTeacher(4), np.array([0, 4]), weight=1.0)


def test_the_log_reads_the_mean_of_the_recorded_terms_once():
    teacher = ItemTeacher(_EchoTeacher(4), np.arange(4), weight=1.0)
    assert teacher.pop_mean() is None
    teacher.record(torch.tensor(1.0, requires_grad=True) * 2.0)  # a step's term, still in its graph
    teacher.record(torch.tensor([4.0]))
    assert teacher.pop_mean() == pytest.approx(3.0) and teacher.pop_mean() is None


def test_distill_is_zero_when_the_student_agrees_and_positive_otherwise(index, rows):
    from sidrec.evaluation.baselines import SASRec

    model, _, ids, _, tgt = _batch(index, rows)
    head, base = model.item_head, model.vocab.base_vocab
    n = len(index.entity_ids)
    torch.manual_seed(0)
    sasrec = SASRec(n, hidden=16, layers=1, heads=1, dropout=0.0, max_len=50)
    teacher = ItemTeacher(sasrec, np.arange(n), weight=1.0, temperature=2.0)
    pos, _ = item_targets(ids, tgt[:, 1:], base, head)
    items, lengths, rank = window_items(head, ids, base)
    j = rank[pos[:, 0], pos[:, 1] + 1]
    same, ok = teacher.logits(items, lengths, pos[:, 0], j - 1)
    assert ok.all()
    assert float(distill_loss(teacher, head, ids, pos, same, base)) == pytest.approx(0.0, abs=1e-5)
    other = torch.randn(same.shape, generator=torch.Generator().manual_seed(1))
    assert float(distill_loss(teacher, head, ids, pos, other, base)) > 0.01
    # a shift of the student's logits changes no probability: still zero
    assert float(distill_loss(teacher, head, ids, pos, same + 3.0, base)) == pytest.approx(0.0, abs=1e-4)


def test_the_term_adds_its_weight_in_training_only_and_is_never_saved(index, rows, tmp_path):
    from sidrec.evaluation.baselines import SASRec
    from sidrec.model.sid_model import load_recommender, save_recommender

    model, tok, ids, mask, tgt = _batch(index, rows)
    head, base = model.item_head, model.vocab.base_vocab
    n = len(index.entity_ids)
    torch.manual_seed(0)
    teacher = ItemTeacher(SASRec(n, hidden=16, layers=1, heads=1, dropout=0.0), np.arange(n), weight=0.5)
    with torch.no_grad():
        h, _ = model.hidden(ids, attention_mask=mask)
        plain = float(item_head_loss(model, h, ids, tgt))
        head.teacher = teacher
        model.train()
        with_kl = float(item_head_loss(model, h, ids, tgt))
        pos, _ = item_targets(ids, tgt[:, 1:], base, head)
        kl = float(distill_loss(teacher, head, ids, pos, head.logits(h[pos[:, 0], pos[:, 1]]), base))
        model.eval()
        assert float(item_head_loss(model, h, ids, tgt)) == pytest.approx(plain, rel=1e-6)
    assert kl > 0 and with_kl == pytest.approx(plain + 0.5 * kl, rel=1e-5)
    assert not any("teacher" in k or "sasrec" in k.lower() for k in model.state_dict())
    save_recommender(model, tok, tmp_path / "m", {"layers": None})
    loaded, _, _ = load_recommender(tmp_path / "m", "tiny", merge=False)
    assert loaded.item_head.teacher is None


def test_config_refuses_distillation_without_an_item_head():
    from pydantic import ValidationError

    from sidrec.config import ModelConfig

    with pytest.raises(ValidationError, match="item_head_distill > 0 needs the item head"):
        ModelConfig(item_head_distill=0.5)
    assert ModelConfig(item_head=1.0, item_head_distill=0.5).item_head_distill == 0.5


def test_pipeline_teacher_is_the_runs_own_sasrec_on_the_heads_rows(ml, index):
    """``stages.item_teacher``: the same-run SASRec (the baseline's seed and settings, trained on the training split),
    its item indices those of the head's rows (the index lists items in its own order, not the dataset's)."""
    from sidrec.config import RunConfig
    from sidrec.evaluation.evaluate import same_run_sasrec
    from sidrec.index.sid_index import SIDIndex
    from sidrec.stages import item_teacher, sasrec_store

    cfg = RunConfig.model_validate({"name": "t", "seed": 3, "data": {"max_history": H},
                                    "model": {"backbone": "tiny", "item_head": 1.0, "item_head_distill": 0.3},
                                    "baselines": {"sasrec": {"hidden": 16, "layers": 1, "heads": 1, "max_epochs": 3}}})
    rev = SIDIndex(entity_ids=index.entity_ids[::-1], codes=index.codes[::-1].copy(), level_sizes=index.level_sizes)
    teacher = item_teacher(ml, rev, cfg)
    assert teacher.weight == pytest.approx(0.3) and teacher.temperature == 1.0
    order = ml.item_index()
    assert teacher.rows.tolist() == [order[e] for e in rev.entity_ids]
    baseline, info = same_run_sasrec(ml, cfg.baselines.sasrec, cfg.seed, H, False, sasrec_store())
    assert info.get("reused")  # the very model the run's baseline reports
    for a, b in zip(teacher.model.parameters(), baseline.parameters()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_training_moves_the_head_toward_the_teacher_and_logs_the_term(index, rows):
    """Through the one training loop: the head's KL to a fixed teacher falls, and the log shows it as
    ``train/distill_kl``."""
    from sidrec.evaluation.baselines import SASRec
    from sidrec.config import TrainConfig
    from sidrec.training.loop import train

    model, enc_, _ = _model(index)
    tr = rows[(rows["split"] == "train") & (rows["task"] == "seqrec")].head(16).reset_index(drop=True)
    n = len(index.entity_ids)
    torch.manual_seed(0)
    sasrec = SASRec(n, hidden=16, layers=1, heads=1, dropout=0.0)
    with torch.no_grad():
        sasrec.item_emb.weight.mul_(100.0)  # a confident teacher, far from the head's uniform start
    model.item_head.teacher = ItemTeacher(sasrec, np.arange(n), weight=5.0)
    logged = []
    cfg = TrainConfig(steps=40, batch_size=16, warmup_steps=0, checkpoint_every=None, lr=1e-2, embedding_lr=5e-2, log_every=5)
    train(model, enc_, tr, cfg, 0, torch.float32, lambda step, m: logged.append(m.get("train/distill_kl")), progress=False)
    kls = [k for k in logged if k is not None]
    assert len(kls) >= 8 and all(np.isfinite(kls))
    assert kls[-1] < 0.8 * kls[0]
