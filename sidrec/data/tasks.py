"""Instruction tasks: (prompt, target) rows built from the dataset and the SID index(es).

Examples are first drawn as *specs* that refer to entities by id (task, template, user, history
item ids, target item/user), then *rendered* against an index into prompt/target strings. A static
run renders once; a dynamic run re-renders after every index refresh, so training targets always
follow the current index.

Prompts are deliberately short: every template word costs compute on every example. SID tokens
appear inline (``<a_3><b_12><c_0>``, users ``<u_a_1>...``) and are encoded atomically by
``sidrec.model.sid_model.Encoder``.

Tasks (weights in ``TasksConfig``):
- ``seqrec``: the recommendation task (also used for valid/test). Two formats (``seqrec_mode``):
  ``window`` (default) -- one example is a window of ``max_history + 1`` consecutive *training*
  items rendered as ``<prefix><sid 1><sid 2>...``; the target span is the SIDs of items 2..n, so one
  forward supervises every item after the first. Each user's training sequence is cut into windows
  from the newest item backwards, consecutive windows sharing one item (the older window's last
  item is the newer one's first, unsupervised, item): every training interaction except a user's
  first is a target exactly once. Valid/test/serving prompts are the same rendering of the last
  ``max_history`` items (:class:`PromptFormat`). ``prefix`` -- one random history prefix of
  ``prompt_history`` items in an instruction template with ONE target item (the earlier format).
- ``text_to_sid``: item text -> SID (STORE: the LLM as tokenizer).
- ``sid_to_text``: SID -> item title (STORE: token -> text reconstruction).
- ``titles_to_sid``: history titles -> next item SID.
- ``user_pred`` (ED2, dual index): an item and users who liked it -> another user who did.
- ``user_to_text`` / ``text_to_user`` (ED2, dual index): user SID <-> preference text.
- ``ts_align`` (TS-Rec): a SID prefix -> the keywords of the items under it.
User-set data and user texts come from the training part of each sequence only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

TEMPLATES: dict[str, list[str]] = {
    "seqrec": ["History: {history} Next:", "User liked {history}. Recommend:", "{history} ->"],
    "text_to_sid": ["Item: {text} ID:", "{text} ->"],
    "sid_to_text": ["Item {sid} title:", "{sid} is"],
    "titles_to_sid": ["Liked: {titles}. Next:", "{titles} ->"],
    "user_pred": ["Item {sid} liked by {users}. Also:", "{sid}: {users} ->"],
    "user_to_text": ["User {user} likes:", "{user} prefers"],
    "text_to_user": ["Likes: {text}. User:", "{text} ->"],
    "ts_align": ["Token {prefix} means:", "{prefix} keywords:"],
}
TARGET_KIND = {"seqrec": "sid", "text_to_sid": "sid", "sid_to_text": "text", "titles_to_sid": "sid",
               "user_pred": "user", "user_to_text": "text", "text_to_user": "user", "ts_align": "text"}
USER_TASKS = ("user_pred", "user_to_text", "text_to_user")
COLUMNS = ["split", "task", "template", "user_id", "prompt", "target", "target_kind", "target_item"]
SPEC_COLUMNS = ["split", "task", "template", "user_id", "history", "target_item", "others", "prefix_len"]
EVAL_TEMPLATE = 0


def seqrec_prompt(history_sids: list[str], template: int = EVAL_TEMPLATE, user_sid: str = "") -> str:
    prompt = TEMPLATES["seqrec"][template].format(history="".join(history_sids))
    return f"{user_sid} {prompt}" if user_sid else prompt


@dataclass(frozen=True)
class PromptFormat:
    """How a history becomes a recommendation prompt -- the one rendering shared by training windows,
    valid/test rows, model selection, the promotion gate and serving.

    ``window``: ``<user sid><prefix><sid 1>...<sid k>`` of the last ``history`` items; ``prefix``: the
    instruction template ``seqrec`` #0 over the last ``history`` items. ``user_levels`` (a dual index): how many
    of the user's SID tokens head the prompt (:meth:`user_head`): 0 none, -1 all of them."""

    mode: str = "prefix"
    prefix: str = ""
    history: int = 10
    user_levels: int = 0

    @classmethod
    def from_config(cls, tasks_cfg, max_history: int, dual: bool = False) -> "PromptFormat":
        users = 0
        if dual and getattr(tasks_cfg, "user_sid_in_prompt", True):
            users = int(getattr(tasks_cfg, "user_prompt_levels", None) or -1)
        if getattr(tasks_cfg, "seqrec_mode", "prefix") == "window":
            return cls("window", tasks_cfg.window_prefix, int(max_history), users)
        return cls("prefix", "", int(tasks_cfg.prompt_history), users)

    @classmethod
    def from_json(cls, d: Optional[dict], prompt_history: int = 10) -> "PromptFormat":
        """From a saved model config; models saved before formats existed used the prefix template (and models saved
        before ``user_levels`` was recorded are served without a user SID, as they always were)."""
        if not d:
            return cls("prefix", "", int(prompt_history))
        return cls(str(d["mode"]), str(d.get("prefix", "")), int(d["history"]), int(d.get("user_levels", 0)))

    def to_json(self) -> dict:
        return {"mode": self.mode, "prefix": self.prefix, "history": self.history, "user_levels": self.user_levels}

    def user_head(self, users, user_id) -> str:
        """The tokens of ``user_id``'s SID in ``users`` (the dual index's user side) that head its prompts: the first
        ``user_levels``, all with -1; none with 0, without a user index, or for a user it does not know."""
        if not self.user_levels or users is None or user_id is None or str(user_id) not in users:
            return ""
        codes = users.codes[users.row_of(str(user_id))]
        codes = codes if self.user_levels < 0 else codes[: self.user_levels]
        return "".join(users.token(lv, int(c)) for lv, c in enumerate(codes))

    def render(self, history_sids: list[str], user_sid: str = "") -> str:
        sids = list(history_sids)[-self.history:]
        if self.mode == "window":
            return f"{user_sid}{self.prefix}{''.join(sids)}"
        return seqrec_prompt(sids, EVAL_TEMPLATE, user_sid)


def train_windows(ds, max_history: int) -> pd.DataFrame:
    """Windows of ``max_history + 1`` items over every user's *training* sequence, newest first.

    Columns ``user_id``, ``items`` (the window), ``newest`` (0 for a user's newest window, 1 for the
    one before, ...). Consecutive windows of a user share exactly one item, so every training
    interaction but the user's first is a target (an item after a window's first) exactly once."""
    W = int(max_history) + 1
    users, wins, ranks = [], [], []
    for user, seq in ds.train_sequences().items():
        end, r = len(seq), 0
        while end > 1:
            start = max(0, end - W)
            users.append(user)
            wins.append(list(seq[start:end]))
            ranks.append(r)
            end, r = start + 1, r + 1
    return pd.DataFrame({"user_id": pd.Series(users, dtype="str"), "items": pd.Series(wins, dtype=object),
                         "newest": np.array(ranks, dtype=np.int64)})


def _titles(items: pd.DataFrame) -> dict[str, str]:
    from sidrec.data.text import short_title

    return {i: short_title(t, 40) for i, t in zip(items["item_id"], items["title"])}


def user_sets(ds) -> dict[str, list[str]]:
    """item -> users who interacted with it in the *training* part of their sequence (sorted, unique)."""
    out: dict[str, set[str]] = {}
    for user, seq in ds.train_sequences().items():
        for item in seq:
            out.setdefault(item, set()).add(user)
    return {i: sorted(u) for i, u in out.items()}


def task_weights(cfg, dual: bool) -> dict[str, float]:
    w = {t: float(getattr(cfg, t, 0.0)) for t in TEMPLATES}
    if not dual:
        for t in USER_TASKS:
            w[t] = 0.0
    return w


def sample_specs(ds, cfg, n_examples: Optional[int], max_history: int, seed: int, dual: bool = False,
                 index_levels: int = 0) -> pd.DataFrame:
    """Training specs. Prefix mode: ``n_examples`` specs, a task drawn by weight, then an example and a
    template uniformly. Window mode: every window of every user (:func:`train_windows`; the newest
    ``max_train_examples`` if set) plus auxiliary specs in proportion to their weights
    (``n_windows * weight / seqrec weight`` each); ``n_examples`` is not used."""
    rng = np.random.default_rng(seed)
    weights = task_weights(cfg, dual)
    if index_levels < 2:
        weights["ts_align"] = 0.0
    if getattr(cfg, "seqrec_mode", "prefix") == "window" and weights["seqrec"] > 0:
        return _window_specs(ds, cfg, weights, max_history, rng, dual, index_levels)
    if n_examples is None:
        raise ValueError("prefix mode needs n_examples")
    tasks = [t for t, w in weights.items() if w > 0]
    p = np.array([weights[t] for t in tasks], dtype=float)
    p /= p.sum()
    drawn = rng.choice(len(tasks), size=n_examples, p=p)
    return pd.DataFrame(_draw_rows(ds, cfg, [tasks[i] for i in drawn], max_history, rng, index_levels), columns=SPEC_COLUMNS)


def _window_specs(ds, cfg, weights: dict, max_history: int, rng, dual: bool, index_levels: int) -> pd.DataFrame:
    wins = train_windows(ds, max_history)
    if cfg.max_train_examples is not None:
        share = weights["seqrec"] / sum(weights.values())
        keep = max(1, int(round(cfg.max_train_examples * share)))
        wins = wins.sort_values(["newest", "user_id"], kind="stable").head(keep).sort_index()
    rows = [("train", "seqrec", 0, u, list(w[:-1]), w[-1], [], 0) for u, w in zip(wins["user_id"], wins["items"])]
    aux = []
    for task, w in weights.items():
        if task != "seqrec" and w > 0:
            aux += [task] * int(round(len(rows) * w / weights["seqrec"]))
    aux = [aux[i] for i in rng.permutation(len(aux))]
    rows += _draw_rows(ds, cfg, aux, max_history, rng, index_levels)
    return pd.DataFrame(rows, columns=SPEC_COLUMNS)


def _draw_rows(ds, cfg, drawn: list[str], max_history: int, rng, index_levels: int) -> list[tuple]:
    """One spec per drawn task name: an example and a template uniformly."""
    if not drawn:
        return []
    prefixes = ds.split("train", max_history)
    hist = prefixes["history"].to_list()
    targ = prefixes["target"].to_list()
    users = prefixes["user_id"].to_list()
    item_ids = ds.items["item_id"].to_list()
    sets = user_sets(ds) if "user_pred" in drawn else {}
    set_items = [i for i, us in sets.items() if len(us) >= 2]
    train_users = list(ds.train_sequences().keys())
    k = cfg.prompt_history

    rows = []
    for task in drawn:
        tmpl = int(rng.integers(len(TEMPLATES[task])))
        if task in ("seqrec", "titles_to_sid"):
            if not hist:
                continue
            j = int(rng.integers(len(hist)))
            rows.append(("train", task, tmpl, users[j], list(hist[j][-k:]), targ[j], [], 0))
        elif task in ("text_to_sid", "sid_to_text"):
            rows.append(("train", task, tmpl, "", [], item_ids[int(rng.integers(len(item_ids)))], [], 0))
        elif task == "user_pred":
            if not set_items:
                continue
            item = set_items[int(rng.integers(len(set_items)))]
            us = sets[item]
            pick = rng.permutation(len(us))[: min(len(us), 4)]
            target, others = us[pick[0]], [us[i] for i in pick[1:]]
            rows.append(("train", task, tmpl, target, [], item, others, 0))
        elif task in ("user_to_text", "text_to_user"):
            rows.append(("train", task, tmpl, train_users[int(rng.integers(len(train_users)))], [], "", [], 0))
        elif task == "ts_align":
            item = item_ids[int(rng.integers(len(item_ids)))]
            rows.append(("train", task, tmpl, "", [], item, [], int(rng.integers(1, index_levels))))
    return rows


def eval_specs(ds, part: str, max_history: int, prompt_history: int) -> pd.DataFrame:
    """One seqrec spec per user of ``valid``/``test``: the last ``prompt_history`` items (window mode:
    pass ``max_history``, see :meth:`PromptFormat.from_config`)."""
    full = ds.split(part, None)  # every item before the target: the prompt shows the last ones, `seen` has all
    shown = min(int(max_history), int(prompt_history))
    return pd.DataFrame({
        "split": part, "task": "seqrec", "template": EVAL_TEMPLATE, "user_id": full["user_id"].to_numpy(),
        "history": [list(h[-shown:]) for h in full["history"]], "target_item": full["target"].to_numpy(),
        "others": [[] for _ in range(len(full))], "prefix_len": 0, "seen": [list(h) for h in full["history"]],
    }, columns=SPEC_COLUMNS + ["seen"])


class Renderer:
    """Renders specs against an item index (and optionally a user index), texts and keywords."""

    def __init__(self, ds, item_index, user_index=None, item_texts: Optional[list[str]] = None,
                 user_texts: Optional[dict[str, str]] = None, keywords: Optional[dict[str, list[str]]] = None,
                 prompt_format: Optional[PromptFormat] = None):
        self.item_sid = {e: item_index.sid(i) for i, e in enumerate(item_index.entity_ids)}
        self.item_index = item_index
        self.user_index = user_index
        self.user_sid = {e: user_index.sid(i) for i, e in enumerate(user_index.entity_ids)} if user_index is not None else {}
        self.titles = _titles(ds.items)
        self.texts = dict(zip(ds.items["item_id"], item_texts)) if item_texts is not None else {}
        self.user_texts = user_texts or {}
        self.keywords = keywords or {}
        self.format = prompt_format or PromptFormat()

    def __call__(self, s) -> tuple[str, str, str]:
        t = TEMPLATES[s.task][s.template]
        sid = self.item_sid
        if s.task == "seqrec":
            usid = self.format.user_head(self.user_index, s.user_id)
            if self.format.mode == "window":
                if s.split == "train":  # a window: the first item is context, the SIDs of every later item are targets
                    items = list(s.history) + [s.target_item]
                    return f"{usid}{self.format.prefix}{sid[items[0]]}", "".join(sid[x] for x in items[1:]), "sid"
                return self.format.render([sid[h] for h in s.history], usid), sid[s.target_item], "sid"
            return seqrec_prompt([sid[h] for h in s.history], s.template, usid), sid[s.target_item], "sid"
        if s.task == "titles_to_sid":
            return t.format(titles="; ".join(self.titles[x] for x in s.history[-5:])), sid[s.target_item], "sid"
        if s.task == "text_to_sid":
            text = self.texts.get(s.target_item) or self.titles[s.target_item]
            return t.format(text=text[:200]), sid[s.target_item], "sid"
        if s.task == "sid_to_text":
            return t.format(sid=sid[s.target_item]), " " + self.titles[s.target_item], "text"
        if s.task == "user_pred":
            return t.format(sid=sid[s.target_item], users="".join(self.user_sid[u] for u in s.others)), self.user_sid[s.user_id], "user"
        if s.task == "user_to_text":
            return t.format(user=self.user_sid[s.user_id]), " " + self.user_texts.get(s.user_id, "")[:160], "text"
        if s.task == "text_to_user":
            return t.format(text=self.user_texts.get(s.user_id, "")[:160]), self.user_sid[s.user_id], "user"
        if s.task == "ts_align":
            row = self.item_index.row_of(s.target_item)
            prefix = "".join(self.item_index.token(lv, int(c)) for lv, c in enumerate(self.item_index.codes[row][: s.prefix_len]))
            kws = self.keywords.get(prefix, [])
            return t.format(prefix=prefix), " " + (", ".join(kws) if kws else self.titles[s.target_item]), "text"
        raise ValueError(f"unknown task {s.task!r}")

    def render(self, specs: pd.DataFrame) -> pd.DataFrame:
        out = [self(s) for s in specs.itertuples(index=False)]
        rows = specs[["split", "task", "template", "user_id"]].copy()
        rows["prompt"] = [o[0] for o in out]
        rows["target"] = [o[1] for o in out]
        rows["target_kind"] = ["sid" if o[2] == "user" else o[2] for o in out]
        rows["target_item"] = specs["target_item"].to_numpy()
        if "seen" in specs.columns:  # valid/test: every item of the user before the target (eval.exclude_history)
            rows["seen"] = specs["seen"].to_numpy()
            return rows[COLUMNS + ["seen"]].reset_index(drop=True)
        return rows[COLUMNS].reset_index(drop=True)


def eval_rows(ds, index, part: str, max_history: int, prompt_history: int, renderer: Optional[Renderer] = None) -> pd.DataFrame:
    """One seqrec row per user for ``valid`` or ``test`` (fixed template, no sampling); with a
    renderer, its prompt format decides the history length."""
    renderer = renderer or Renderer(ds, index, prompt_format=PromptFormat("prefix", "", prompt_history))
    return renderer.render(eval_specs(ds, part, max_history, renderer.format.history))


def build_instructions(ds, index, cfg, n_train: Optional[int], max_history: int, seed: int, user_index=None,
                       keywords: Optional[dict[str, list[str]]] = None) -> pd.DataFrame:
    """The whole instruction set: train rows (windows or sampled prefixes) + one valid and one test row per user."""
    from sidrec.data.text import item_texts, user_texts

    dual = user_index is not None
    specs = sample_specs(ds, cfg, n_train, max_history, seed, dual=dual, index_levels=index.num_levels if keywords else 0)
    utexts = dict(zip(*user_texts(ds))) if dual else None
    fmt = PromptFormat.from_config(cfg, max_history, dual)
    renderer = Renderer(ds, index, user_index, item_texts=item_texts(ds), user_texts=utexts, keywords=keywords,
                        prompt_format=fmt)
    parts = [renderer.render(specs)] + [renderer.render(eval_specs(ds, p, max_history, fmt.history)) for p in ("valid", "test")]
    out = pd.concat(parts, ignore_index=True)
    out["seen"] = [s if isinstance(s, list) else None for s in out["seen"]]  # train rows: none
    return out
