"""A cache of text embeddings keyed by the text itself (``features.cache``).

Embedding a catalog's texts with the backbone is the slowest preparation step on a CPU, and most of
it is repeated: a retraining sees the same items plus a few new ones, a benchmark re-runs the same
dataset with other index settings, two datasets share product texts. Vectors are stored per
*embedder identity* -- the embedder, the backbone folder's weights and config (file names, sizes
and modification times), the number of layers, the token limit and the compute dtype -- under
``$SIDREC_HOME/cache/embeddings/<identity>/``, one row per distinct text (sha256 of the text).
Only texts not in the cache are embedded; the store is rewritten atomically (temp file, then rename),
so an interrupted run leaves the previous cache intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np


def text_key(text: str) -> str:
    return hashlib.sha256((text or "").encode("utf-8")).hexdigest()


def folder_fingerprint(folder: Path) -> list:
    """A model folder's identity: names, sizes and modification times of its weight, config and
    tokenizer files, plus a digest of each safetensors header and of its first MiB of tensor data (two
    checkpoints of one architecture differ there even when copied with the same sizes and times)."""
    folder = Path(folder)
    keep = (".safetensors", ".json", ".model", ".txt")
    out = []
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and p.name.endswith(keep)):
            continue
        entry = [p.name, p.stat().st_size, int(p.stat().st_mtime)]
        if p.name.endswith(".safetensors"):
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                entry.append(hashlib.sha256(f.read(min(n, 1 << 24)) + f.read(1 << 20)).hexdigest()[:16])
        out.append(entry)
    return out


def identity(**parts) -> str:
    """A short digest of what determines an embedding (embedder, weights, layers, token limit, dtype)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class EmbeddingCache:
    """``get_or_compute(texts, compute)`` -> ``[len(texts), dim]`` float32, embedding only the misses."""

    def __init__(self, root: Path, ident: str):
        self.dir = Path(root) / ident
        self.hits = 0
        self.misses = 0

    def _load(self) -> tuple[list[str], Optional[np.ndarray]]:
        store = self.dir / "store.npz"
        if not store.is_file():
            return [], None
        try:
            with np.load(store, allow_pickle=False) as z:
                keys, vecs = [str(k) for k in z["keys"]], z["vectors"]
        except (OSError, ValueError, KeyError):
            return [], None  # a damaged cache is ignored and rebuilt, never trusted
        if vecs.ndim != 2 or len(keys) != vecs.shape[0]:
            return [], None
        return keys, vecs

    def _store(self, keys: list[str], vecs: np.ndarray) -> None:
        """Keys and vectors in ONE file, replaced atomically: readers and concurrent writers never see a
        key list paired with another run's vectors (the last complete write wins)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".store-{uuid.uuid4().hex[:8]}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array(keys, dtype="<U64"), vectors=np.ascontiguousarray(vecs, dtype=np.float32))
        os.replace(tmp, self.dir / "store.npz")

    def get_or_compute(self, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        keys, vecs = self._load()
        row = {k: i for i, k in enumerate(keys)}
        want = [text_key(t) for t in texts]
        missing: dict[str, str] = {}
        for k, t in zip(want, texts):
            if k not in row and k not in missing:
                missing[k] = t
        self.misses, self.hits = len(missing), len(set(want)) - len(missing)
        if missing:
            new = np.asarray(compute(list(missing.values())), dtype=np.float32)
            if vecs is not None and vecs.shape[1] != new.shape[1]:  # a store from another embedder: start over,
                rest = {k: t for k, t in zip(want, texts) if k not in missing}  # embedding only what was a hit
                if rest:
                    new = np.vstack([new, np.asarray(compute(list(rest.values())), dtype=np.float32)])
                keys, vecs, row = [], None, {}
                missing = {**missing, **rest}
                self.misses, self.hits = len(missing), 0
            base = len(keys)
            keys = keys + list(missing)
            vecs = new if vecs is None else np.vstack([vecs, new])
            row.update({k: base + j for j, k in enumerate(missing)})
            self._store(keys, vecs)
        return vecs[[row[k] for k in want]] if want else np.zeros((0, 0 if vecs is None else vecs.shape[1]), np.float32)


__all__ = ["EmbeddingCache", "folder_fingerprint", "identity", "text_key"]
