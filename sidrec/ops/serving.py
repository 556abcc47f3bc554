"""Serving: the recommender as an MLflow pyfunc model, logged as *code* (no pickle).

This file is both a normal module (``sidrec.ops.serving``) and the MLflow "models from code" file:
``mlflow.pyfunc.log_model(python_model=<this file>)`` copies it into the model and, at load time,
MLflow executes it under a generated module name, where the last lines call
``mlflow.models.set_model(SIDRecPyfunc())``. No Python object is pickled: the model is this source
file + its artifacts, all in safe formats:

- ``recommender``: LoRA adapter + SID embeddings (safetensors) + tokenizer + vocab/meta JSON (an ensemble: one such
  folder per member under ``members/<k>``, with the member's own SID index when ``train.member_index`` is ``own``)
- ``index``: the IndexBundle folder (SID index Parquet, quantizer safetensors, report JSON)
- ``items``: ``items.csv`` with ``item_id,title``
- ``data_profile`` (optional): ``data_profile.json``, the training data summary used by the drift report

``model_config`` carries ``backbone`` (a spec for :func:`sidrec.model.sid_model.load_backbone`: the backbone
weights are referenced, not copied), ``beams``, ``prompt_history``, ``dtype`` and ``k``.

predict input: a DataFrame with a ``history`` column (a list of item ids or a comma-separated
string), an optional ``k`` column and an optional ``user_id`` column (a dual index trained with the users' SIDs at
the head of its prompts puts the user's there too; a user the index does not know, or none, gets none). Output:
one row per recommendation with ``request`` (input row number), ``rank``, ``item_id``, ``title``, ``score`` (beam
log-probability), best first.
"""

import json
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from sidrec.errors import DataError

SERVING_FILE = Path(__file__).resolve()
ARTIFACT_KEYS = ("recommender", "index", "items")


class UnknownItemsError(DataError):
    """A request names item ids the model's SID index does not know."""


def parse_history(value) -> list[str]:
    """A history as a list of item-id strings: accepts a list/array or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        parts = value.split(",")
    else:
        try:
            parts = list(value)
        except TypeError:
            parts = [value]
    return [str(p).strip() for p in parts if str(p).strip()]


class Recommender:
    """The loaded model: backbone + adapter (merged) + SID embeddings, the SID index + trie, item titles."""

    def __init__(self, recommender_dir, index_dir, items_csv, config: Optional[dict] = None):
        from sidrec.artifacts import IndexBundle, load_model
        from sidrec.model.fusion import IndexEnsemble
        from sidrec.model.sid_model import Encoder

        cfg = dict(config or {})
        self.config = cfg
        self.backbone = cfg.get("backbone") or json.loads((Path(recommender_dir) / "meta.json").read_text())["backbone"]
        # one model, a seed ensemble, or members on their own SID indexes (each renders the history in its own SIDs)
        self.model, tok, self.meta = load_model(Path(recommender_dir), self.backbone)
        self.fused = isinstance(self.model, IndexEnsemble)
        self.encoder = Encoder(tok, self.model.vocab)
        self.bundle = IndexBundle.load(Path(index_dir))
        self.index = self.bundle.items
        self.users = self.bundle.users  # a dual index's users (their SIDs head the prompts, per the prompt format)
        self.trie = self.index.build_trie()
        items = pd.read_csv(items_csv, dtype=str, keep_default_na=False)
        self.titles = dict(zip(items["item_id"], items["title"]))
        self.beams = int(cfg.get("beams", 20))
        self.default_k = int(cfg.get("k", 10))
        self.prompt_history = int(cfg.get("prompt_history", 10))
        self.exclude_history = bool(cfg.get("exclude_history", False))  # never recommend an item of the history
        from sidrec.data.tasks import PromptFormat

        # the training format (saved with the model); models saved before formats existed used the prefix template
        self.prompt_format = PromptFormat.from_json(cfg.get("prompt_format") or self.meta.get("prompt_format"), self.prompt_history)
        from sidrec.runtime import dtype_named

        self.dtype = dtype_named(cfg.get("dtype", "float32"))  # auto: resolved on the serving machine's CPU

    def unknown(self, history: Sequence[str]) -> list[str]:
        return [h for h in history if h not in self.index]

    def prompt_text(self, history: Sequence[str], user_id: Optional[str] = None) -> str:
        """The prompt of a history (known items only), in the training format and the run's SIDs, headed by the
        user's SID where the model was trained so (``PromptFormat.user_head``)."""
        head = self.prompt_format.user_head(self.users, user_id)
        return self.prompt_format.render([self.index.sid_of(h) for h in history], head)

    def prompt(self, history: Sequence[str], user_id: Optional[str] = None) -> list[int]:
        return self.encoder.encode(self.prompt_text(history, user_id))

    def member_texts(self, histories: list[list[str]]) -> list[list[str]]:
        """An own-index ensemble's prompt texts: per member, every history rendered in that member's own SIDs."""
        return [[self.prompt_format.render([ix.sid_of(h) for h in hist]) for hist in histories] for ix in self.model.indexes]

    def member_prompts(self, histories: list[list[str]]) -> list[list[list[int]]]:
        """:meth:`member_texts`, tokenized by each member's encoder (what ``recommend_fused`` reads)."""
        return [[enc.encode(t) for t in texts] for enc, texts in zip(self.model.encoders, self.member_texts(histories))]

    def recommend(self, histories: list[list[str]], k: int | None = None,
                  user_ids: Optional[Sequence[Optional[str]]] = None) -> list[pd.DataFrame]:
        """Top-``k`` items per history (trie-constrained beam search, best first); ``user_ids`` (one per history, or
        None) for a dual index whose prompts start with the user's SID."""
        from sidrec.model.decode import recommend

        k = int(k or self.default_k)
        if k < 1:
            raise DataError(f"k must be >= 1, got {k}")
        bad = sorted({u for h in histories for u in self.unknown(h)})
        if bad:
            more = f" (+{len(bad) - 20} more)" if len(bad) > 20 else ""
            raise UnknownItemsError(f"unknown item ids (not in this model's SID index): {', '.join(bad[:20])}{more}")
        if any(not h for h in histories):
            raise DataError("an empty history: give at least one item id")
        users = list(user_ids) if user_ids is not None else [None] * len(histories)
        if len(users) != len(histories):
            raise DataError(f"{len(users)} user ids for {len(histories)} histories: give one per history (or None)")
        beams = max(self.beams, k) + (10 if self.exclude_history else 0)  # room for the history items dropped below
        if self.fused:
            from sidrec.model.fusion import recommend_fused

            rows, scores, _ = recommend_fused(self.model, self.member_prompts(histories), beams, 16, self.dtype, progress=False)
        else:
            prompts = [self.prompt(h, u) for h, u in zip(histories, users)]
            rows, scores, _ = recommend(self.model, prompts, self.index, beams, 16, self.trie, self.encoder.pad_id, self.dtype,
                                        progress=False)
        if self.exclude_history:
            from sidrec.evaluation.metrics import drop_seen

            rows, scores = drop_seen(rows, [{self.index.row_of(h) for h in hist} for hist in histories], scores)
        out = []
        for r, s in zip(rows, scores):
            keep = [(int(i), float(v)) for i, v in zip(r, s) if i >= 0][:k]
            ids = [self.index.entity_ids[i] for i, _ in keep]
            out.append(pd.DataFrame({"rank": range(1, len(keep) + 1), "item_id": ids,
                                     "title": [self.titles.get(i, "") for i in ids],
                                     "score": [round(v, 6) for _, v in keep]}))
        return out


def _absent(value) -> bool:
    """A request cell left empty: None, or NaN where pandas filled a column some rows lack."""
    return value is None or (isinstance(value, float) and value != value)


def _pyfunc_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class SIDRecPyfunc(_pyfunc_base()):
    """MLflow pyfunc wrapper around :class:`Recommender`."""

    def load_context(self, context):
        arts = context.artifacts
        self.rec = Recommender(arts["recommender"], arts["index"], arts["items"], dict(context.model_config or {}))

    def predict(self, context, model_input: pd.DataFrame, params=None):  # the hint: no type-hint schema (the signature has it)
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "history" not in df.columns:
            raise DataError("predict input needs a 'history' column (list of item ids or 'id,id,...')")
        histories = [parse_history(h) for h in df["history"]]
        user_ids = [None if _absent(u) or not str(u).strip() else str(u).strip()
                    for u in df["user_id"]] if "user_id" in df.columns else [None] * len(df)
        # a row's own k wins; then the request's params k (the signature's default when not sent)
        pk = (params or {}).get("k")
        ks = df["k"].tolist() if "k" in df.columns else [None] * len(df)
        ks = [pk if _absent(k) else k for k in ks]
        frames = []
        # group by k so each group is one batched decode
        by_k: dict = {}
        for i, k in enumerate(ks):
            k = None if _absent(k) else int(k)
            by_k.setdefault(k, []).append(i)
        results: dict[int, pd.DataFrame] = {}
        for k, idx in by_k.items():
            for i, res in zip(idx, self.rec.recommend([histories[i] for i in idx], k, [user_ids[i] for i in idx])):
                results[i] = res
        for i in range(len(df)):
            frames.append(results[i].assign(request=i))
        if not frames:
            return pd.DataFrame(columns=["request", "rank", "item_id", "title", "score"])
        return pd.concat(frames, ignore_index=True)[["request", "rank", "item_id", "title", "score"]]


if __name__ not in ("sidrec.ops.serving", "__main__"):  # executed by MLflow as a models-from-code file
    # use the installed module's classes so errors and types are the same as `sidrec.ops.serving`'s
    import mlflow.models

    from sidrec.ops.serving import SIDRecPyfunc as _InstalledPyfunc

    mlflow.models.set_model(_InstalledPyfunc())
