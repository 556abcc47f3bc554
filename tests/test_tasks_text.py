"""Entity text, prompt building and instruction rows on real MovieLens-100k."""
from __future__ import annotations

import re

import numpy as np
import pytest

from sidrec.config import DataConfig, TasksConfig
from sidrec.data.dataset import load_dataset
from sidrec.index.sid_index import SIDIndex
from sidrec.data.tasks import COLUMNS, TEMPLATES, build_instructions, seqrec_prompt
from sidrec.data.text import item_text, item_texts, user_texts

SID_RE = re.compile(r"<[a-z]_\d+>")


@pytest.fixture(scope="module")
def ml(ml100k_dir):
    return load_dataset(DataConfig(format="recbole", path=str(ml100k_dir), max_users=120, kcore=5))


@pytest.fixture(scope="module")
def index(ml):
    n = len(ml.items)
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 8, n), rng.integers(0, 8, n), np.arange(n)], 1)  # unique by the last level
    return SIDIndex(entity_ids=ml.items["item_id"].tolist(), codes=codes, level_sizes=[8, 8, n])


def test_item_text_template_movielens(ml):
    row = ml.items.iloc[0].to_dict()
    text = item_text(row, ml.text_fields)
    assert text.startswith(row["title"])
    assert f"({row['year']})" in text and "Genres:" in text
    assert len(item_texts(ml)) == len(ml.items)


def test_user_text_uses_training_history_only(ml):
    users, texts = user_texts(ml, n_titles=50)
    titles = dict(zip(ml.items["item_id"], ml.items["title"]))
    seqs = dict(zip(ml.sequences["user_id"], ml.sequences["item_ids"]))
    u = users[0]
    test_title, valid_title = titles[seqs[u][-1]], titles[seqs[u][-2]]
    train_titles = {titles[i] for i in seqs[u][:-2]}
    text = texts[0]
    assert "age" in text  # profile fields from ml-100k.user
    if test_title not in train_titles:
        assert test_title[:30] not in text
    if valid_title not in train_titles:
        assert valid_title[:30] not in text


def test_instruction_rows_formats_and_no_leakage(ml, index):
    cfg = TasksConfig(seqrec=1.0, seqrec_mode="prefix", text_to_sid=0.5, sid_to_text=0.5, titles_to_sid=0.5, prompt_history=5)
    rows = build_instructions(ml, index, cfg, n_train=400, max_history=20, seed=0)
    assert list(rows.columns) == COLUMNS + ["seen"]  # seen: valid/test only (eval.exclude_history)
    train = rows[rows.split == "train"]
    assert len(train) == 400 and set(train.task) == {"seqrec", "text_to_sid", "sid_to_text", "titles_to_sid"}
    n_levels = index.num_levels
    for r in train.itertuples():
        if r.target_kind == "sid":
            assert len(SID_RE.findall(r.target)) == n_levels and r.target == index.sid_of(r.target_item)
        else:
            assert not SID_RE.findall(r.target) and r.target.strip()
        if r.task == "seqrec":
            assert len(SID_RE.findall(r.prompt)) <= 5 * n_levels
        if r.task == "sid_to_text":
            assert index.sid_of(r.target_item) in r.prompt
    # valid/test: one per user, fixed template, targets = the split's held-out items
    seqs = dict(zip(ml.sequences["user_id"], ml.sequences["item_ids"]))
    for part, pos in (("valid", -2), ("test", -1)):
        ev = rows[rows.split == part]
        assert len(ev) == len(seqs)
        assert all(seqs[u][pos] == t for u, t in zip(ev.user_id, ev.target_item))
    # no leakage: a seqrec/titles training example's target is never a user's valid/test position
    train_part = {u: s[:-2] for u, s in seqs.items()}
    rec = train[train.task.isin(["seqrec", "titles_to_sid"])]
    assert all(t in train_part[u] for u, t in zip(rec.user_id, rec.target_item))


def test_seqrec_prompt_is_short(index):
    p = seqrec_prompt([index.sid(i) for i in range(10)])
    words = SID_RE.sub("", p).split()
    assert len(words) <= 3


def test_dual_index_user_tasks_and_no_user_set_leakage(ml, index):
    users = ml.sequences["user_id"].tolist()
    rng = np.random.default_rng(1)
    ucodes = np.stack([rng.integers(0, 4, len(users)), np.arange(len(users))], 1)
    uindex = SIDIndex(entity_ids=users, codes=ucodes, level_sizes=[4, len(users)], prefix="u_")
    cfg = TasksConfig(seqrec=1.0, text_to_sid=0, sid_to_text=0, titles_to_sid=0, user_pred=1.0, user_to_text=0.5,
                      text_to_user=0.5, prompt_history=5)
    rows = build_instructions(ml, index, cfg, n_train=300, max_history=20, seed=0, user_index=uindex)
    train = rows[rows.split == "train"]
    assert {"user_pred", "user_to_text", "text_to_user", "seqrec"} <= set(train.task)
    USER_RE = re.compile(r"<u_[a-z]_\d+>")
    seqs = dict(zip(ml.sequences["user_id"], ml.sequences["item_ids"]))
    train_part = {u: set(s[:-2]) for u, s in seqs.items()}
    for r in train.itertuples():
        if r.task == "user_pred":
            # target is a user SID; every user named in the prompt and the target liked the item in TRAINING
            assert r.target == uindex.sid_of(r.user_id) and len(USER_RE.findall(r.target)) == 2
            assert r.target_item in train_part[r.user_id]
            prompt_users = USER_RE.findall(r.prompt)
            named = {uindex.entity_for_codes(uindex.parse("".join(prompt_users[i:i + 2])))
                     for i in range(0, len(prompt_users), 2)}
            assert all(r.target_item in train_part[u] for u in named)
            assert r.user_id not in named
        if r.task == "text_to_user":
            assert r.target == uindex.sid_of(r.user_id)
        if r.task == "seqrec":
            assert r.prompt.startswith(uindex.sid_of(r.user_id))  # the user's own SID leads the prompt
