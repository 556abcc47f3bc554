"""Raw SID collisions vs codes per level and last-level balance (issue 14 item 4).

For the quickstart's and Scientific's own index inputs (``stages.index_inputs`` of ``configs/quickstart.yaml`` and
``configs/scientific-item-head.yaml``: hybrid text + co-occurrence) and the synthetic 10k / 50k-user catalogs of
``bench/scale.py`` (backbone text features, first 10 layers), RQ-KMeans with M = 3 at N = ``auto`` and 2x ``auto``, each
with ``balance`` none and last (seed 0, 50 iterations). Per setting: the raw collision rate; the items whose prefix
cell (first M - 1 codes) holds more than N items, which no last-level assignment can separate; cells used; the
largest cell; level-0 perplexity. Index fitting only (seconds per setting; text features from the cache).

    HF_HUB_OFFLINE=1 SIDREC_PROGRESS=0 .venv/bin/python bench/collisions.py

JSON under ``bench/results/collisions_vs_n.json``. Needs ``../shared/data/amazon-scientific`` (configs' data.path)."""
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from sidrec import stages  # noqa: E402
from sidrec.config import load_config, parse_config  # noqa: E402
from sidrec.index.collisions import code_stats, prefix_cells, raw_collision_rate  # noqa: E402
from sidrec.index.quantize import auto_codebook_size, fit_rq_kmeans  # noqa: E402


def analyse(x, w, n_codes: int, balance: str, seed: int = 0) -> dict:
    raw = fit_rq_kmeans(x, 3, n_codes, seed, 50, column_weights=w, balance=balance).assign(x)
    stats = code_stats(raw, [n_codes] * 3)  # level-0 perplexity
    cells = prefix_cells(raw, n_codes)  # overfull: items in a prefix cell holding more than N, inseparable in M levels
    n_cells = int(round(cells["prefix_cells"] * len(raw)))
    _, full_inv, full_cnt = np.unique(raw, axis=0, return_inverse=True, return_counts=True)
    return {"N": n_codes, "balance": balance, "raw": round(raw_collision_rate(raw), 3),
            "items_in_shared_codes": round(float((full_cnt[full_inv.ravel()] > 1).mean()), 3),
            "cells_used": n_cells, "cells_possible": n_codes * n_codes,
            "items_per_used_cell": round(float(len(x) / n_cells), 2), "largest_cell": int(cells["largest_cell"]),
            "items_in_overfull_cells": round(cells["overfull"], 4),
            "level0_perplexity": round(stats["perplexity_level_0"], 1)}


def catalogs():
    """(name, index input, column weights) of every catalog measured."""
    for name, path in [("ml100k-quickstart", "configs/quickstart.yaml"), ("scientific", "configs/scientific-item-head.yaml")]:
        cfg = load_config(ROOT / path)
        ds = stages.ingest(cfg)
        x, w = stages.index_inputs(stages.featurize(ds, cfg), cfg)
        yield name, x, w
    import scale

    for users in (10000, 50000):
        inter, items = scale.synth_catalog(users, seed=0)
        d = Path(tempfile.mkdtemp())
        inter.to_csv(d / "i.csv", index=False)
        items.to_csv(d / "it.csv", index=False)
        cfg = parse_config({"name": "c", "seed": 0,
                            "data": {"format": "table", "path": str(d / "i.csv"), "items_path": str(d / "it.csv"),
                                     "name": f"synthetic-{users}", "max_history": 20},
                            "features": {"embedder": "backbone", "batch_size": 64},
                            "model": {"backbone": "smollm2", "layers": 10}}, "c")
        yield f"synthetic-{users}", stages.featurize(stages.ingest(cfg), cfg).item_embeddings, None


def main() -> None:
    out = []
    for name, x, w in catalogs():
        a = auto_codebook_size(len(x), 3)
        for n_codes in (a, 2 * a):
            for bal in ("none", "last"):
                t = time.time()
                r = {"catalog": name, "items": len(x), **analyse(x, w, n_codes, bal), "s": round(time.time() - t, 1)}
                print(json.dumps(r), flush=True)
                out.append(r)
    (ROOT / "bench" / "results" / "collisions_vs_n.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
