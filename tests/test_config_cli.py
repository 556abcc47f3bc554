"""The config schema and the CLI's error contract."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidrec.config import load_config, parse_config
from sidrec.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name


@pytest.mark.parametrize("data, needle", [
    ({"index": {"levls": 3}}, "index.levls': unknown key"),
    ({"index": {"levels": 0}}, "index.levels"),
    ({"index": {"codebook_size": 1}}, "codebook_size"),
    ({"eval": {"beams": 5, "ks": [10]}}, "larger than beams"),
    ({"train": {"steps": "many"}}, "train.steps"),
    ({"data": {"format": "xml"}}, "data.format"),
    ({"tasks": {"seqrec": 0, "text_to_sid": 0, "sid_to_text": 0, "titles_to_sid": 0}}, "at least one task"),
    ([1, 2], "top level must be a mapping"),
    ({"index": {"mode": "dynamic"}, "train": {"processes": 2}}, "train.processes > 1 is not supported with index.mode 'dynamic'"),
    ({"index": {"mode": "dynamic"}, "model": {"device": "cuda"}}, "model.device 'cuda' is not supported"),
])
def test_bad_configs_name_the_field(data, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(data, "x.yaml")
    msg = str(e.value)
    assert needle in msg and msg.startswith("x.yaml") and "\n" not in msg


def test_base_configs_are_merged_key_by_key(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "root.yaml").write_text("seed: 1\ntrain: {steps: 10, lr: 0.01}\neval: {ks: [1, 5, 10]}\n")
    (tmp_path / "mid.yaml").write_text("base: shared/root.yaml\nname: mid\ntrain: {steps: 20}\n")
    (tmp_path / "leaf.yaml").write_text("base: [mid.yaml]\ntrain: {batch_size: 3}\neval: {ks: [1]}\n")
    cfg = load_config(tmp_path / "leaf.yaml")
    assert (cfg.name, cfg.seed) == ("mid", 1)  # inherited through two levels, paths relative to each file
    assert (cfg.train.steps, cfg.train.lr, cfg.train.batch_size) == (20, 0.01, 3)  # mappings merged, nearest wins
    assert cfg.eval.ks == [1]  # lists replaced, not appended
    # a shipped ablation says only what differs from the quickstart recipe, and is that recipe otherwise
    abl = load_config(REPO / "configs" / "ablations" / "static-rqvae.yaml").model_dump(mode="json")
    quick = load_config(REPO / "configs" / "quickstart.yaml").model_dump(mode="json")
    assert (abl["index"]["quantizer"], abl["name"]) == ("rq_vae", "static-rqvae")
    assert (abl["model"]["item_head"], quick["model"]["item_head"]) == (0.0, 1.0)  # the grid compares SID heads alone
    assert (abl["index"]["balance"], quick["index"]["balance"]) == ("none", "last")  # balancing is RQ-KMeans'
    abl["index"]["balance"] = quick["index"]["balance"]
    abl["index"]["quantizer"], abl["name"], abl["model"]["item_head"] = quick["index"]["quantizer"], quick["name"], 1.0
    assert abl == quick


def test_a_repeated_key_is_refused_with_both_lines(tmp_path):
    p = tmp_path / "twice.yaml"
    p.write_text("name: x\ntrain:\n  steps: 3\neval: {ks: [1]}\ntrain:\n  steps: 4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: key 'train' appears twice in one mapping \(lines 2 and 5\)"):
        load_config(p)
    p.write_text("train: {steps: 3, steps: 4}\n")  # inside a section too
    with pytest.raises(ConfigError, match="key 'steps' appears twice"):
        load_config(p)
    # YAML's own merge keys are not repeats
    merged = tmp_path / "merge.yaml"
    merged.write_text("name: m\ntrain:\n  <<: {steps: 3, batch_size: 2}\n  lr: 0.01\n")
    assert (load_config(merged).train.steps, load_config(merged).train.lr) == (3, 0.01)


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  path: data/ml-100k\nindex:\n  levls: 3\n")
    out = _cli("train", "--config", str(bad))
    assert out.returncode == 2
    err = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "index.levls" in err[0]
    assert "Traceback" not in out.stderr


def test_cli_missing_data_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  path: {tmp_path / 'nope'}\n")
    out = _cli("train", "--config", str(cfg))
    assert out.returncode == 2 and "data.path does not exist" in out.stderr and "Traceback" not in out.stderr


def test_cli_help_lists_commands():
    out = _cli("--help")
    assert out.returncode == 0 and "train" in out.stdout and "fetch" in out.stdout
    out = _cli("train", "--help")
    assert "--config" in out.stdout and "--metrics-out" in out.stdout


def test_only_the_listed_third_party_future_warnings_are_hidden():
    import warnings

    from sidrec.runtime import quiet_third_party_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party_warnings()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated", DeprecationWarning)  # another category
        warnings.warn("some other API is deprecated", FutureWarning)
    assert [(w.category, str(w.message)) for w in seen] == [
        (DeprecationWarning, "`is_gradient_checkpointing` is deprecated"),
        (FutureWarning, "some other API is deprecated")]
