"""One same-run SASRec per (data, settings, seed): a content-addressed store of trained baselines.

A run that builds its hybrid index from SASRec's item table (``index.hybrid.source: sasrec``) needs the
baseline before the index, and the baselines step needs it again after fine-tuning. Both ask
:func:`sidrec.evaluation.evaluate.same_run_sasrec`, which trains once and keeps the model here, keyed by a
hash of everything that decides it: the training sequences, the early-stopping split, the catalog size,
the SASRec settings, the seed and the training code. Same inputs, same model; any change is a new key.
A run stopped by its wall-clock cap is never stored (where the cap bites depends on the machine's load).
Entries are written to a temporary folder and renamed into place, so a reader never sees half a model;
a damaged entry is ignored and retrained.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np


def sasrec_key(train: Sequence[Sequence[int]], n_items: int, valid: tuple[Sequence[Sequence[int]], np.ndarray],
               settings: dict, seed: int) -> str:
    """Hex digest of everything that decides a same-run SASRec (the training code included)."""
    from sidrec.evaluation import baselines

    h = hashlib.sha256()
    h.update(json.dumps({"n_items": int(n_items), "seed": int(seed), "settings": settings}, sort_keys=True).encode())
    h.update(hashlib.sha256(inspect.getsource(baselines).encode()).digest())
    for part in (train, valid[0]):
        h.update(b"|")
        for seq in part:
            h.update(np.asarray(seq, dtype=np.int64).tobytes())
            h.update(b";")
    h.update(np.asarray(valid[1], dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


class SasrecStore:
    """``get(key)`` -> ``(model, info)`` or None; ``put(key, model, info)``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def get(self, key: str):
        from sidrec.evaluation.baselines import load_sasrec

        d = self.root / key
        info_path = d / "info.json"
        if not info_path.is_file():
            return None
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            model = load_sasrec(d)
        except Exception:  # noqa: BLE001 -- any unreadable entry (bad JSON, truncated safetensors, wrong shapes)
            shutil.rmtree(d, ignore_errors=True)  # damaged: dropped and retrained, never trusted
            return None
        return model, {**info, "reused": True}

    def put(self, key: str, model, info: dict) -> None:
        from sidrec.evaluation.baselines import save_sasrec

        if info.get("stopped") == "time_cap":
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        try:
            save_sasrec(model, tmp)
            (tmp / "info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
            try:
                os.rename(tmp, self.root / key)
            except OSError:  # another process stored the same key first: theirs is the same model
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

