"""Shared helpers for the benchmarks in ``bench/``.

- ``env_info()``: hardware / software / load description recorded in every result JSON.
- ``interleaved()``: timing of several variants with interleaved repeats (the machine is shared,
  so ratios are measured inside one process, variant order rotated every repeat, medians taken).
- ``ml100k_index()``: a real SID index over the MovieLens-100k items (MiniLM embeddings of the
  item texts -> RQ-KMeans, M=3, codebook 'auto'), cached under ``.sidrec/bench-cache``.
- ``sid_model()``: SmolLM2 (or another backbone) wrapped in ``SIDRecModel`` with SID embeddings
  initialised exactly as the pipeline does (no trained adapter).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".sidrec" / "bench-cache"
RESULTS = ROOT / "bench" / "results"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

from sidrec.runtime import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()  # a benchmark's log shows its progress and results, not transformers' deprecations


# --------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return float("nan")


def load_note() -> dict:
    la = os.getloadavg()
    return {"loadavg_1_5_15": [round(x, 2) for x in la], "cores": os.cpu_count(),
            "note": "shared machine: other developers' jobs ran concurrently" if la[0] > 0.5 * (os.cpu_count() or 1) else "lightly loaded"}


def env_info() -> dict:
    import transformers

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gb": _ram_gb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_at_start": load_note(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def set_threads(n: Optional[int]) -> int:
    torch.set_num_threads(n or os.cpu_count() or 1)
    return torch.get_num_threads()


def config_with_overrides(path, sets: list[str]) -> dict:
    """The config at ``path`` as a dict with ``KEY=VALUE`` overrides (dotted keys, YAML values) applied; parse it
    with ``sidrec.config.parse_config``."""
    import yaml

    from sidrec.config import load_config

    base = load_config(path).model_dump(mode="json")
    for kv in sets:
        key, _, val = kv.partition("=")
        node = base
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(val)
    return base


def write_json(path, obj) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    print(f"wrote {p}")
    return p


def save_figure(fig, path) -> Path:
    """Lay out a matplotlib figure and write it as PNG (dpi 100), creating the folder."""
    p = Path(path)
    fig.tight_layout()
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100)
    print(f"wrote {p}")
    return p


def _jsonable(o):
    """numpy scalars/arrays and paths as the artifacts serialise them; anything else as its str()."""
    from sidrec.artifacts import _json_default

    try:
        return _json_default(o)
    except TypeError:
        return str(o)


# --------------------------------------------------------------------------- timing


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 0,
                return_last: bool = False):
    """Wall seconds of each variant, ``repeats`` times, variants interleaved (order rotated per repeat).

    With ``return_last`` also returns each variant's last return value (so results can be checked
    without extra runs).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, object] = {}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            last[n] = fns[n]()
            out[n].append(time.perf_counter() - t0)
    return (out, last) if return_last else out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-repeat ratios (each pair ran back to back, so it shares the machine's load)."""
    return float(statistics.median([a / b for a, b in zip(num, den)]))


# --------------------------------------------------------------------------- data, index, model


def ml100k():
    from sidrec.config import load_config
    from sidrec.data.dataset import load_dataset

    cfg = load_config(QUICKSTART)
    return load_dataset(cfg.data), cfg


def ml100k_index(ds, levels: int = 3, codebook="auto", seed: int = 42):
    """SIDIndex over MovieLens-100k items: MiniLM item-text embeddings -> RQ-KMeans (cached)."""
    from sidrec.config import IndexConfig
    from sidrec.index.sid_index import SIDIndex
    from sidrec.index.quantize import quantize
    from sidrec.data.text import item_texts, minilm_embeddings

    d = CACHE / f"ml100k-minilm-rqkmeans-M{levels}-{codebook}-s{seed}"
    if (d / "index.json").is_file():
        return SIDIndex.load(d), json.loads((d / "build.json").read_text())
    t0 = time.perf_counter()
    emb_file = CACHE / "ml100k-minilm.npy"
    if emb_file.is_file():
        emb = np.load(emb_file)
    else:
        emb = minilm_embeddings(item_texts(ds), progress=False)
        emb_file.parent.mkdir(parents=True, exist_ok=True)
        np.save(emb_file, emb)
    t_emb = time.perf_counter() - t0
    res = quantize(emb, IndexConfig(quantizer="rq_kmeans", levels=levels, codebook_size=codebook,
                                   collisions="extra_level"), seed, progress=False)
    index = SIDIndex(entity_ids=ds.items["item_id"].tolist(), codes=res.codes, level_sizes=list(res.level_sizes))
    index.save(d)
    build = {"embedder": "all-MiniLM-L6-v2", "quantizer": "rq_kmeans", "levels_raw": levels, "codebook": codebook,
             "level_sizes": list(res.level_sizes), "num_items": len(index), "collisions": int(res.collisions),
             "embed_s": round(t_emb, 1), "total_s": round(time.perf_counter() - t0, 1)}
    (d / "build.json").write_text(json.dumps(build, indent=2))
    return index, build


def sid_model(index, backbone: str = "smollm2", seed: int = 42, lora=None):
    """``(SIDRecModel, tokenizer, Encoder)``; SID embeddings initialised as in the pipeline."""
    from sidrec.model.sid_model import Encoder, SIDRecModel, SIDVocab, add_lora, load_backbone

    lm, tok = load_backbone(backbone)
    for p in lm.parameters():
        p.requires_grad_(False)
    if lora is not None:
        lm = add_lora(lm, lora)
    vocab = SIDVocab.from_index(index, lm.get_input_embeddings().weight.shape[0])
    model = SIDRecModel(lm, vocab, seed=seed)
    return model, tok, Encoder(tok, vocab)


def seqrec_prompts(ds, index, encoder, n: int, part: str = "test", max_history: int = 20, prompt_history: int = 10) -> list[list[int]]:
    """Encoded evaluation prompts (``History: <sids> Next:``) of the first ``n`` users."""
    from sidrec.data.tasks import eval_rows

    rows = eval_rows(ds, index, part, max_history, prompt_history).head(n)
    return [encoder.encode(p) for p in rows["prompt"]]


def paired_at_10(preds, single) -> dict:
    """``preds`` minus ``single`` on the same test users, user by user (an ensemble against one member, a variant
    against a base model): mean difference of hit@10 and NDCG@10 and the standard error of each (from
    ``stages.evaluate``'s predictions: the target's rank, 0 = not in the list; users of ``preds`` only)."""
    def per_user(p):
        t = p[p["split"] == "test"].set_index("user_id")["hit_rank"]
        return t

    a, b = per_user(preds), per_user(single).reindex(per_user(preds).index)
    out = {}
    for name, f in (("recall_at_10", lambda r: ((r >= 1) & (r <= 10)).astype(float)),
                    ("ndcg_at_10", lambda r: np.where((r >= 1) & (r <= 10), 1.0 / np.log2(np.maximum(r, 1) + 1.0), 0.0))):
        d = f(a.to_numpy()) - f(b.to_numpy())
        out[name] = {"diff": round(float(d.mean()), 5), "se": round(float(d.std(ddof=1) / np.sqrt(len(d))), 5)}
    return out
