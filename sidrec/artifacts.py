"""The pipeline's typed artifacts, each saved in safe formats (JSON, Parquet, safetensors).

`Dataset` (sidrec.data.dataset) and `QualityReport` (sidrec.data.validation) live next to their logic;
this module holds the rest. Every ``save`` writes into a fresh folder; ``load`` reads it back.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class EntityFeatures:
    """Texts and embeddings of items (and users) in a fixed order."""

    item_ids: list[str]
    item_texts: list[str]
    item_embeddings: np.ndarray
    user_ids: list[str] = field(default_factory=list)
    user_texts: list[str] = field(default_factory=list)
    user_embeddings: Optional[np.ndarray] = None
    embedder: str = "backbone"
    item_collab: Optional[np.ndarray] = None  # index.embedding: hybrid (sidrec.index.collab), rows in item_ids order
    user_collab: Optional[np.ndarray] = None  # ... and the mean of each user's training items' rows, in user_ids order

    def save(self, directory: Path) -> None:
        from safetensors.numpy import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"item_embeddings": np.ascontiguousarray(self.item_embeddings, dtype=np.float32)}
        if self.user_embeddings is not None:
            tensors["user_embeddings"] = np.ascontiguousarray(self.user_embeddings, dtype=np.float32)
        if self.item_collab is not None:
            tensors["item_collab"] = np.ascontiguousarray(self.item_collab, dtype=np.float32)
        if self.user_collab is not None:
            tensors["user_collab"] = np.ascontiguousarray(self.user_collab, dtype=np.float32)
        save_file(tensors, str(directory / "embeddings.safetensors"))
        pd.DataFrame({"item_id": self.item_ids, "text": self.item_texts}).to_parquet(directory / "items.parquet", index=False)
        pd.DataFrame({"user_id": self.user_ids, "text": self.user_texts}).to_parquet(directory / "users.parquet", index=False)
        _write_json(directory / "meta.json", {"embedder": self.embedder})

    @classmethod
    def load(cls, directory: Path) -> "EntityFeatures":
        from safetensors.numpy import load_file

        t = load_file(str(directory / "embeddings.safetensors"))
        items = pd.read_parquet(directory / "items.parquet")
        users = pd.read_parquet(directory / "users.parquet")
        meta = json.loads((directory / "meta.json").read_text())
        return cls(
            item_ids=items["item_id"].tolist(), item_texts=items["text"].tolist(), item_embeddings=t["item_embeddings"],
            user_ids=users["user_id"].tolist(), user_texts=users["text"].tolist(),
            user_embeddings=t.get("user_embeddings"), embedder=meta["embedder"], item_collab=t.get("item_collab"),
            user_collab=t.get("user_collab"),
        )


@dataclass
class IndexBundle:
    """The SID index of items (and users), the quantizer state that can assign new entities, and its report."""

    items: "object"  # sidrec.index.sid_index.SIDIndex
    state: "object"  # sidrec.index.quantize.QuantizerState
    report: dict
    users: Optional["object"] = None
    usage_png: Optional[bytes] = None
    # index.embedding: hybrid -- the collaborative vectors the quantizer saw, rows in items.entity_ids
    # order, kept so a later run can rotate its own vectors into this basis (sidrec.index.collab.align)
    collab: Optional[np.ndarray] = None

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.items.save(directory / "items")
        if self.collab is not None:
            from safetensors.numpy import save_file

            save_file({"item_collab": np.ascontiguousarray(self.collab, dtype=np.float32)}, str(directory / "collab.safetensors"))
        self.state.save(directory / "quantizer")
        if self.users is not None:
            self.users.save(directory / "users")
        _write_json(directory / "report.json", self.report)
        if self.usage_png is not None:
            (directory / "code_usage.png").write_bytes(self.usage_png)

    @classmethod
    def load(cls, directory: Path) -> "IndexBundle":
        from sidrec.index.sid_index import SIDIndex
        from sidrec.index.quantize import QuantizerState

        png = directory / "code_usage.png"
        collab = None
        if (directory / "collab.safetensors").exists():
            from safetensors.numpy import load_file

            collab = load_file(str(directory / "collab.safetensors"))["item_collab"]
        return cls(
            items=SIDIndex.load(directory / "items"),
            state=QuantizerState.load(directory / "quantizer"),
            report=json.loads((directory / "report.json").read_text()),
            users=SIDIndex.load(directory / "users") if (directory / "users").exists() else None,
            usage_png=png.read_bytes() if png.exists() else None, collab=collab,
        )


@dataclass
class InstructionSet:
    """Instruction rows (split, task, template, user_id, prompt, target, target_kind, target_item)."""

    rows: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def part(self, split: str) -> pd.DataFrame:
        return self.rows[self.rows["split"] == split].reset_index(drop=True)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.rows.to_parquet(directory / "rows.parquet", index=False)
        # a human-readable sample next to the Parquet file
        sample = self.rows.groupby(["split", "task"], sort=True).head(5)
        sample.to_json(directory / "sample.jsonl", orient="records", lines=True, force_ascii=False)
        _write_json(directory / "meta.json", self.meta)

    @classmethod
    def load(cls, directory: Path) -> "InstructionSet":
        return cls(pd.read_parquet(directory / "rows.parquet"), json.loads((directory / "meta.json").read_text()))

    def counts(self) -> dict[str, int]:
        return {f"{s}/{t}": int(n) for (s, t), n in self.rows.groupby(["split", "task"]).size().items()}


@dataclass
class TrainedRecommender:
    """A folder: LoRA adapter + SID embeddings + tokenizer + vocab + meta (see sidrec.model.sid_model.save_recommender)."""

    path: Path
    meta: dict = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        if Path(self.path).resolve() != directory.resolve():
            shutil.copytree(self.path, directory, dirs_exist_ok=True)
        _write_json(directory / "meta.json", self.meta)

    @classmethod
    def load(cls, directory: Path) -> "TrainedRecommender":
        return cls(path=directory, meta=json.loads((directory / "meta.json").read_text()))


@dataclass
class EvalReport:
    """Metrics (flat, MLflow names), per-user predictions, and baseline metrics."""

    metrics: dict[str, float]
    predictions: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / "metrics.json", self.metrics)
        self.predictions.to_parquet(directory / "predictions.parquet", index=False)
        _write_json(directory / "meta.json", self.meta)

    @classmethod
    def load(cls, directory: Path) -> "EvalReport":
        return cls(
            metrics=json.loads((directory / "metrics.json").read_text()),
            predictions=pd.read_parquet(directory / "predictions.parquet"),
            meta=json.loads((directory / "meta.json").read_text()),
        )


def load_model(model_dir: Path, backbone: str, merge: bool = True):
    """``(model, tokenizer, meta)`` of a saved recommender folder of any kind: one model, a seed ensemble on one index
    (``SeedEnsemble``, decoded as one search), or members on their own SID indexes (``train.member_index: own``:
    an ``IndexEnsemble``, fused at the item level by ``sidrec.model.fusion``; each member's index is saved with it
    under ``members/<k>/index``)."""
    from sidrec.errors import ModelError
    from sidrec.model.sid_model import load_recommender

    model_dir = Path(model_dir)
    meta_file = model_dir / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("member_index") != "own":
        return load_recommender(model_dir, backbone, merge)
    from sidrec.model.fusion import IndexEnsemble

    members, indexes, tok = [], [], None
    for k in range(len(meta.get("members", []))):
        d = model_dir / "members" / str(k)
        if not (d / "index").is_dir():
            raise ModelError(f"{d}: a member without its SID index (index/ missing); train the ensemble again")
        m, t, _ = load_recommender(d, backbone, merge)
        members.append(m)
        indexes.append(IndexBundle.load(d / "index").items)
        tok = tok or t
    if not members:
        raise ModelError(f"{model_dir}: meta.json lists no members")
    model = IndexEnsemble(members, indexes, tok)
    model.eval()
    return model, tok, meta


def member_parts(model_dir: Path, parts=("valid", "test")) -> list[dict[str, pd.DataFrame]]:
    """Per member of an own-index ensemble, its ``valid``/``test`` instruction rows (its prompts: the history in its
    own SIDs), saved beside its index under ``members/<k>/instructions``."""
    meta = json.loads((Path(model_dir) / "meta.json").read_text())
    out = []
    for k in range(len(meta["members"])):
        inst = InstructionSet.load(Path(model_dir) / "members" / str(k) / "instructions")
        out.append({p: inst.part(p) for p in parts})
    return out
