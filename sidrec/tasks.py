"""Instruction tasks: (prompt, target) rows built from the dataset and the SID index.

Prompts are deliberately short: every template word costs compute on every example.
SID tokens appear inline (``<a_3><b_12><c_0>``) and are encoded atomically by
``sidrec.model.Encoder``.

Tasks (weights in ``TasksConfig``):
- ``seqrec``: history SIDs -> next item SID (the recommendation task; also used for valid/test).
- ``text_to_sid``: item text -> SID (STORE: the LLM as tokenizer).
- ``sid_to_text``: SID -> item title (STORE: token -> text reconstruction).
- ``titles_to_sid``: history titles -> next item SID.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

TEMPLATES: dict[str, list[str]] = {
    "seqrec": ["History: {history} Next:", "User liked {history}. Recommend:", "{history} ->"],
    "text_to_sid": ["Item: {text} ID:", "{text} ->"],
    "sid_to_text": ["Item {sid} title:", "{sid} is"],
    "titles_to_sid": ["Liked: {titles}. Next:", "{titles} ->"],
}
TARGET_KIND = {"seqrec": "sid", "text_to_sid": "sid", "sid_to_text": "text", "titles_to_sid": "sid"}
COLUMNS = ["split", "task", "template", "user_id", "prompt", "target", "target_kind", "target_item"]
EVAL_TEMPLATE = 0


def seqrec_prompt(history_sids: list[str], template: int = EVAL_TEMPLATE) -> str:
    return TEMPLATES["seqrec"][template].format(history="".join(history_sids))


def _titles(items: pd.DataFrame) -> dict[str, str]:
    from sidrec.text import short_title

    return {i: short_title(t, 40) for i, t in zip(items["item_id"], items["title"])}


def eval_rows(ds, index, part: str, max_history: int, prompt_history: int) -> pd.DataFrame:
    """One seqrec row per user for ``valid`` or ``test`` (fixed template, no sampling)."""
    split = ds.split(part, max_history)
    sids = {e: index.sid(i) for i, e in enumerate(index.entity_ids)}
    prompts = [seqrec_prompt([sids[h] for h in hist[-prompt_history:]]) for hist in split["history"]]
    return pd.DataFrame(
        {
            "split": part,
            "task": "seqrec",
            "template": EVAL_TEMPLATE,
            "user_id": split["user_id"].to_numpy(),
            "prompt": prompts,
            "target": [sids[t] for t in split["target"]],
            "target_kind": "sid",
            "target_item": split["target"].to_numpy(),
        },
        columns=COLUMNS,
    )


def train_rows(ds, index, cfg, n_examples: int, max_history: int, seed: int) -> pd.DataFrame:
    """``n_examples`` training rows: a task drawn by weight, then an example and a template uniformly.

    seqrec/titles_to_sid draw from every prefix of the training part of each user's sequence;
    text_to_sid/sid_to_text draw from the item catalog.
    """
    from sidrec.text import item_texts

    rng = np.random.default_rng(seed)
    weights = {t: getattr(cfg, t) for t in TEMPLATES}
    tasks = [t for t, w in weights.items() if w > 0]
    p = np.array([weights[t] for t in tasks], dtype=float)
    p /= p.sum()
    drawn = rng.choice(len(tasks), size=n_examples, p=p)

    sids = {e: index.sid(i) for i, e in enumerate(index.entity_ids)}
    titles = _titles(ds.items)
    prefixes = ds.split("train", max_history)
    hist = prefixes["history"].to_list()
    targ = prefixes["target"].to_list()
    users = prefixes["user_id"].to_list()
    item_ids = ds.items["item_id"].to_list()
    texts = item_texts(ds) if weights["text_to_sid"] > 0 else None
    k = cfg.prompt_history

    rows = []
    for ti in drawn:
        task = tasks[ti]
        tmpl_i = int(rng.integers(len(TEMPLATES[task])))
        tmpl = TEMPLATES[task][tmpl_i]
        if task in ("seqrec", "titles_to_sid"):
            if not hist:
                continue
            j = int(rng.integers(len(hist)))
            h = hist[j][-k:]
            if task == "seqrec":
                prompt = tmpl.format(history="".join(sids[x] for x in h))
            else:
                prompt = tmpl.format(titles="; ".join(titles[x] for x in h[-5:]))
            rows.append(("train", task, tmpl_i, users[j], prompt, sids[targ[j]], "sid", targ[j]))
        else:
            j = int(rng.integers(len(item_ids)))
            item = item_ids[j]
            if task == "text_to_sid":
                rows.append(("train", task, tmpl_i, "", tmpl.format(text=texts[j][:200]), sids[item], "sid", item))
            else:
                rows.append(("train", task, tmpl_i, "", tmpl.format(sid=sids[item]), " " + titles[item], "text", item))
    return pd.DataFrame(rows, columns=COLUMNS)


def build_instructions(ds, index, cfg, n_train: int, max_history: int, seed: int) -> pd.DataFrame:
    """The whole instruction set: sampled train rows + one valid and one test row per user."""
    parts = [
        train_rows(ds, index, cfg, n_train, max_history, seed),
        eval_rows(ds, index, "valid", max_history, cfg.prompt_history),
        eval_rows(ds, index, "test", max_history, cfg.prompt_history),
    ]
    return pd.concat(parts, ignore_index=True)
