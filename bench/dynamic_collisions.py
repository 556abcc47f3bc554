"""Where the dynamic index's raw collisions come from (issue 13): the tokenizer phases' regulator alone.

Starts the learned quantizer (``sidrec.index.dynamic.LearnedQuantizer``) from the quickstart's static index (the
default: 64 codes x 3, last level balanced) and trains it for the quickstart's tokenizer budget (35 steps, two
refreshes) on ED2's regulator and the reconstruction term only -- no LLM, so seconds per setting -- with the
codebooks at several learning rates, the rest of the quantizer at ``tokenizer_lr`` 3e-3. Each refresh is the
library's own (``reassign``: prices refitted, at most 10% moved). Reports the raw collision rate and where it
comes from (``prefix_cells``) at both refreshes, four seeds per setting.

    .venv/bin/python bench/dynamic_collisions.py     # -> bench/results/dynamic_collisions.json
    .venv/bin/python bench/dynamic_collisions.py --config configs/scientific-item-head.yaml --set index.codebook_size=128 \
        --out scientific/dynamic_collisions           # any config's index inputs and index settings
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402
from sidrec import stages  # noqa: E402
from sidrec.config import parse_config  # noqa: E402
from sidrec.index.dynamic import LearnedQuantizer, reassign  # noqa: E402
from sidrec.index.quantize import quantize  # noqa: E402
from sidrec.index.sid_index import SIDIndex  # noqa: E402

TOKENIZER_LR = 3e-3
# codebook learning rate as a share of the tokenizer's: 1 is what a dynamic run did before index.dynamic.codeword_lr
SHARES = {"1 (= tokenizer_lr)": 1.0, "1/10": 0.1, "1/50": 0.02, "0 (frozen)": 0.0}


def train(res, x: np.ndarray, share: float, seed: int, dcfg, steps: int = 35, batch: int = 64) -> dict:
    lq = LearnedQuantizer(res.state, x, hidden_dim=dcfg.hidden_dim, seed=seed)
    index = SIDIndex(entity_ids=[str(i) for i in range(len(x))], codes=res.codes, level_sizes=res.level_sizes)
    books = list(lq.codebooks)
    rest = [p for p in lq.parameters() if all(p is not cb for cb in books)]
    opt = torch.optim.AdamW([{"params": rest, "lr": TOKENIZER_LR}, {"params": books, "lr": TOKENIZER_LR * share}],
                            weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    refreshes = []
    for step in range(steps):
        rows = torch.randperm(len(x), generator=g)[:batch]
        tok, recon = lq.regulator(rows, torch.from_numpy(index.codes[rows.numpy()]))
        loss = dcfg.token_align * tok + dcfg.recon * recon
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (steps // 2 - 1, steps - 1):  # two cycles: a refresh at the end of each tokenizer phase
            index, st = reassign(lq, index, dcfg.max_churn, dcfg.churn_margin)
            refreshes.append({k: round(float(st[k]), 4) for k in
                              ("churn", "collision_rate_raw", "raw_in_room", "raw_overfull", "quant_error")})
    moved = [float((cb.detach() - lq.start(lv)).pow(2).sum(1).mean().sqrt()) for lv, cb in enumerate(books)]
    return {"refreshes": refreshes, "codeword_moved_rms": [round(m, 3) for m in moved]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. index.codebook_size=128")
    ap.add_argument("--out", default="dynamic_collisions", help="results name under bench/results/")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = parse_config(common.config_with_overrides(args.config, args.set), args.config)
    x, w = stages.index_inputs(stages.featurize(stages.ingest(cfg), cfg), cfg)
    res = quantize(x, cfg.index, stages.index_seed(cfg), column_weights=w, progress=False)
    out = {"static": {"collision_rate_raw": round(res.raw_collision_rate, 4),
                      **{k: round(v, 4) for k, v in res.stats.items() if k.startswith("raw_")}},
           "codeword_rms": [round(float(np.sqrt((cb ** 2).sum(1).mean())), 3) for cb in res.state.codebooks],
           "settings": {}}
    print("static", out["static"], flush=True)
    dcfg = cfg.index.dynamic
    for name, share in SHARES.items():
        t = time.time()
        runs = [train(res, x, share, seed, dcfg) for seed in (42, 43, 44, 45)]
        final = [r["refreshes"][-1]["collision_rate_raw"] for r in runs]
        out["settings"][name] = {"runs": runs, "final_raw_mean": round(float(np.mean(final)), 4),
                                 "final_raw_range": [min(final), max(final)], "seconds": round(time.time() - t, 1)}
        print(name, "final raw collisions", final, "codewords moved", runs[0]["codeword_moved_rms"], flush=True)
    out["config"], out["overrides"] = str(args.config), list(args.set)
    path = ROOT / "bench" / "results" / f"{args.out}.json"
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
