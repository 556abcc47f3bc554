"""TS-Rec keywords / SA-Init / TS-Align, and the static LSH index (S-LSH)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from sidrec.config import DataConfig, IndexConfig, TasksConfig
from sidrec.data.dataset import load_dataset
from sidrec.index.sid_index import SIDIndex
from sidrec.index.keywords import prefix_keywords, sa_init, token_keywords
from sidrec.index.quantize import QuantizerState, quantize
from sidrec.data.text import item_texts


@pytest.fixture(scope="module")
def ml(ml100k_dir):
    return load_dataset(DataConfig(format="recbole", path=str(ml100k_dir), max_users=150, kcore=5))


@pytest.fixture(scope="module")
def genre_index(ml):
    """Level 0 = first genre word of the item, so keywords of a level-0 token must be that genre."""
    genres = [g.split()[0] if g else "none" for g in ml.items["genres"]]
    names = sorted(set(genres))
    c0 = np.array([names.index(g) for g in genres])
    c1 = np.arange(len(genres))
    return SIDIndex(entity_ids=ml.items["item_id"].tolist(), codes=np.stack([c0, c1], 1),
                    level_sizes=[len(names), len(genres)]), names


def test_keywords_follow_the_items_under_a_token(ml, genre_index):
    index, names = genre_index
    texts = item_texts(ml)
    tk = token_keywords(index, texts, top_k=5)
    pk = prefix_keywords(index, texts, top_k=5)
    for code, genre in enumerate(names):
        if genre in ("none",) or (index.codes[:, 0] == code).sum() < 5:
            continue
        tok = index.token(0, code)
        word = re.findall(r"[a-z]+", genre.lower())[0]  # "Film-Noir" -> "film", "Children's" -> "children"
        assert word in tk[tok], (genre, tk[tok])
        assert pk[tok] == tk[tok]  # level-0 prefix == level-0 token


def test_sa_init_is_mean_of_keyword_embeddings(genre_index, ml):
    from sidrec.model.sid_model import SIDVocab, load_backbone

    index, _ = genre_index
    lm, tok = load_backbone("tiny")
    vocab = SIDVocab.from_index(index, lm.get_input_embeddings().weight.shape[0])
    emb = lm.get_input_embeddings().weight.detach()
    fallback = torch.zeros(len(vocab), emb.shape[1])
    kws = {vocab.tokens[0]: ["comedy", "romance"]}
    table, share = sa_init(vocab, kws, tok, emb, fallback)
    ids = tok(" comedy", add_special_tokens=False)["input_ids"] + tok(" romance", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(table[0], emb[torch.tensor(ids)].mean(0))
    assert torch.equal(table[1:], fallback[1:]) and share == pytest.approx(1 / len(vocab))


def test_ts_align_rows(ml, genre_index):
    from sidrec.data.tasks import build_instructions

    index, _ = genre_index
    kws = prefix_keywords(index, item_texts(ml), top_k=3)
    cfg = TasksConfig(seqrec=0.5, text_to_sid=0, sid_to_text=0, titles_to_sid=0, ts_align=1.0)
    rows = build_instructions(ml, index, cfg, n_train=60, max_history=20, seed=0, keywords=kws)
    ts = rows[rows.task == "ts_align"]
    assert len(ts) > 10
    for r in ts.itertuples():
        prefix = r.prompt.split()[1] if r.prompt.startswith("Token") else r.prompt.split()[0]
        assert r.target.strip() == ", ".join(kws[prefix]) or not kws.get(prefix)


def test_static_lsh_unique_deterministic_and_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 32)).astype("float32")
    cfg = IndexConfig(quantizer="lsh", levels=2, codebook_size=16)
    a, b = quantize(x, cfg, seed=3), quantize(x, cfg, seed=3)
    assert np.array_equal(a.codes, b.codes) and a.collisions == 0
    assert len({tuple(c) for c in a.codes.tolist()}) == 500
    assert a.stats["utilization_level_0"] > 0.5
    a.state.save(tmp_path / "q")
    assert np.array_equal(QuantizerState.load(tmp_path / "q").assign(x), a.state.assign(x))
    with pytest.raises(ValueError, match="power of two"):
        quantize(x, IndexConfig(quantizer="lsh", levels=2, codebook_size=12), seed=0)
