"""The text-embedding cache: only new texts are embedded, vectors come back in the caller's order,
a different embedder identity never shares vectors, and a damaged store is rebuilt, not trusted."""
from __future__ import annotations

import numpy as np

from sidrec.data.embedding_cache import EmbeddingCache, identity


def _embedder(calls):
    def compute(texts):
        calls.append(list(texts))
        return np.array([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts], dtype=np.float32)
    return compute


def test_only_new_texts_are_embedded_and_rows_keep_the_callers_order(tmp_path):
    calls = []
    cache = EmbeddingCache(tmp_path, identity(embedder="x", layers=10))
    first = cache.get_or_compute(["a", "bb", "a", "ccc"], _embedder(calls))
    assert calls == [["a", "bb", "ccc"]] and (cache.hits, cache.misses) == (0, 3)
    assert np.array_equal(first[0], first[2]) and first.shape == (4, 3)
    # a later run (a retraining: two old texts, one new), in another order, from a fresh cache object
    again = EmbeddingCache(tmp_path, identity(embedder="x", layers=10))
    second = again.get_or_compute(["ccc", "dddd", "a"], _embedder(calls))
    assert calls[-1] == ["dddd"] and (again.hits, again.misses) == (2, 1)
    assert np.array_equal(second[0], first[3]) and np.array_equal(second[2], first[0])
    # another embedder identity (e.g. other layers) never reuses these vectors
    other = EmbeddingCache(tmp_path, identity(embedder="x", layers=30))
    other.get_or_compute(["a"], _embedder(calls))
    assert calls[-1] == ["a"]


def test_a_damaged_store_is_rebuilt(tmp_path):
    calls = []
    cache = EmbeddingCache(tmp_path, "id")
    cache.get_or_compute(["a", "b"], _embedder(calls))
    (tmp_path / "id" / "store.npz").write_bytes(b"not a numpy file")
    out = EmbeddingCache(tmp_path, "id").get_or_compute(["a", "b"], _embedder(calls))
    assert calls[-1] == ["a", "b"] and out.shape == (2, 3)
    assert not [p for p in (tmp_path / "id").iterdir() if p.name.startswith(".store-")]  # no temp file left


def test_featurize_reuses_the_cache_across_runs(tmp_path, monkeypatch, ml100k_dir):
    """Through the real stage: a second featurize of the same data embeds nothing and returns the same
    vectors (the embedding function is spied on; the backbone is the real SmolLM2 cut to 2 layers)."""
    from sidrec import stages, text
    from sidrec.config import parse_config

    monkeypatch.setenv("SIDREC_HOME", str(tmp_path))
    cfg = parse_config({"data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 20, "kcore": 3},
                        "model": {"backbone": "smollm2", "layers": 2, "dtype": "float32"},
                        "features": {"max_text_tokens": 16}})
    ds = stages.ingest(cfg)
    seen = []
    real = text.backbone_embeddings
    monkeypatch.setattr(text, "backbone_embeddings", lambda texts, *a, **k: seen.append(len(texts)) or real(texts, *a, **k))
    first = stages.featurize(ds, cfg)
    second = stages.featurize(ds, cfg)
    assert seen == [len(set(first.item_texts))]  # each distinct text embedded once, then served from the cache
    assert np.array_equal(first.item_embeddings, second.item_embeddings)
    assert list((tmp_path / "cache" / "embeddings").iterdir())


def test_a_store_of_another_dimension_is_replaced_embedding_each_text_once(tmp_path):
    calls = []
    EmbeddingCache(tmp_path, "id").get_or_compute(["a", "b"], _embedder(calls))
    wide = lambda texts: calls.append(list(texts)) or np.ones((len(texts), 5), np.float32)  # noqa: E731
    out = EmbeddingCache(tmp_path, "id").get_or_compute(["a", "c", "b"], wide)
    assert out.shape == (3, 5) and calls[1:] == [["c"], ["a", "b"]]  # the new text, then the old ones once
    again = EmbeddingCache(tmp_path, "id")
    assert again.get_or_compute(["b"], wide).shape == (1, 5) and (again.hits, again.misses) == (1, 0)
