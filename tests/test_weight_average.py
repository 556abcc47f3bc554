"""The moving average of the trained weights (``train.ema``): its arithmetic, that model selection scores it and the
model ends as it, that it leaves the trained trajectory alone, and that a run with it resumes from a checkpoint
bit-identical to an uninterrupted one (tiny backbone, real MovieLens-100k rows, CPU)."""
from __future__ import annotations

import pytest
import torch

from sidrec.config import TrainConfig, parse_config
from sidrec.errors import ConfigError
from sidrec.training.ema import WeightAverage

# the real MovieLens-100k slice, its index, the window rows and the tiny model factory of the sequence-training tests
from test_sequence_training import rows, tiny  # noqa: E402,F401  (pytest fixtures)
from test_tasks_text import index, ml  # noqa: E402,F401


def _manual(start: dict, trajectory: list[dict], decay: float) -> dict:
    """The average the docstring promises: start at the initial weights, rate min(decay, (1 + n) / (10 + n))."""
    avg = {n: t.float().clone() for n, t in start.items()}
    for n_upd, live in enumerate(trajectory):
        d = min(decay, (1.0 + n_upd) / (10.0 + n_upd))
        for n in avg:
            avg[n] = d * avg[n] + (1.0 - d) * live[n].float()
    return avg


def test_the_average_follows_its_formula_and_applied_gives_the_live_weights_back():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = WeightAverage([("p", p)], 0.5)
    values = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 0.0, -1.0]), torch.tensor([5.0, 5.0, 5.0])]
    for v in values:
        with torch.no_grad():
            p.copy_(v)
        ema.update()
    want = _manual({"p": torch.zeros(3)}, [{"p": v} for v in values], 0.5)["p"]
    # rates 1/10, 2/11, 3/12: the ramp, still below the decay
    assert torch.allclose(ema.shadow["p"], want, atol=1e-6)
    assert ema.rate() == pytest.approx(4 / 13) and ema.updates == 3
    with ema.applied():
        assert torch.allclose(p.detach(), want, atol=1e-6)
    assert torch.equal(p.detach(), values[-1])  # the live weights are back
    for _ in range(10):
        ema.update()
    assert ema.rate() == 0.5  # then capped at the decay
    with pytest.raises(ValueError, match="train.ema"):
        WeightAverage([("p", p)], 1.0)


def test_the_config_refuses_an_average_with_a_dynamic_index():
    with pytest.raises(ConfigError, match="train.ema is not supported with index.mode 'dynamic'"):
        parse_config({"index": {"mode": "dynamic"}, "train": {"ema": 0.99}})
    assert parse_config({"train": {"ema": 0.99}}).train.ema == 0.99
    with pytest.raises(ConfigError, match="train.ema"):
        parse_config({"train": {"ema": 1.5}})


def _train_rows(rows):
    return rows[rows["split"] == "train"].reset_index(drop=True)


def test_selection_scores_the_average_and_the_model_ends_as_it(rows, tiny):
    from sidrec.training.loop import train, trainable_parameters

    steps, decay = 6, 0.6
    # the live trajectory, snapshotted after every step (scoring the model does not change what is trained)
    model, enc = tiny()
    start = {n: p.detach().clone() for n, p in trainable_parameters(model)}
    live = []

    def snap(m):
        live.append({n: p.detach().clone() for n, p in trainable_parameters(m)})
        return 0.0

    cfg = TrainConfig(steps=steps, batch_size=4, warmup_steps=0, eval_every=1, checkpoint_every=None, lr=1e-2,
                      embedding_lr=1e-2)
    train(model, enc, _train_rows(rows), cfg, 0, torch.float32, progress=False, select=snap)
    assert len(live) == steps

    # the same training with the average: selection (every 2 steps) sees the average, the best one is kept
    model, enc = tiny()
    seen = []
    scores = iter([0.1, 0.9, 0.2])  # step 4 wins

    def scripted(m):
        seen.append({n: p.detach().clone() for n, p in trainable_parameters(m)})
        return next(scores)

    res = train(model, enc, _train_rows(rows), cfg.model_copy(update={"eval_every": 2, "ema": decay}), 0,
                torch.float32, progress=False, select=scripted)
    assert res.best_step == 4
    for k, step in enumerate((2, 4, 6)):
        want = _manual(start, live[:step], decay)
        for n in want:
            assert torch.allclose(seen[k][n].float(), want[n], atol=1e-5), f"{n} at step {step}"
        assert any(not torch.equal(seen[k][n], live[step - 1][n]) for n in want)  # not the live weights
    for n, p in trainable_parameters(model):
        assert torch.equal(p.detach(), seen[1][n])  # the step-4 average is the model

    # without selection the model ends as the last average
    model, enc = tiny()
    train(model, enc, _train_rows(rows), cfg.model_copy(update={"eval_every": None, "ema": decay}), 0, torch.float32,
          progress=False)
    want = _manual(start, live, decay)
    for n, p in trainable_parameters(model):
        assert torch.allclose(p.detach().float(), want[n], atol=1e-5), n


def test_a_run_with_the_average_resumes_bit_identical(rows, tiny, tmp_path):
    from sidrec.training.loop import train, trainable_parameters

    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=0, eval_every=3, checkpoint_every=2, lr=1e-2,
                      embedding_lr=1e-2, ema=0.6, checkpoint_dir=str(tmp_path))

    class Crash(RuntimeError):
        pass

    def crash_at_step_3(m):  # the checkpoint of step 2 is on disk by then
        raise Crash()

    model, enc = tiny()
    with pytest.raises(Crash):
        train(model, enc, _train_rows(rows), cfg, 0, torch.float32, progress=False, checkpoint_dir=tmp_path / "ck",
              select=crash_at_step_3)
    assert list((tmp_path / "ck").glob("*/ckpt-0000002"))

    scores = iter([0.5, 0.4])  # step 3 wins: the kept weights are an average restored mid-run
    model, enc = tiny()
    res = train(model, enc, _train_rows(rows), cfg, 0, torch.float32, progress=False, checkpoint_dir=tmp_path / "ck",
                select=lambda m: next(scores))
    assert res.resumed_from == 2 and res.best_step == 3
    resumed = {n: p.detach().clone() for n, p in trainable_parameters(model)}

    scores = iter([0.5, 0.4])
    model, enc = tiny()
    res = train(model, enc, _train_rows(rows), cfg, 0, torch.float32, progress=False, checkpoint_dir=tmp_path / "fresh",
                select=lambda m: next(scores))
    assert res.resumed_from == 0
    for n, p in trainable_parameters(model):
        assert torch.equal(p.detach(), resumed[n]), f"{n} differs after resume"
