"""Semantic-ID index (entity <-> code tuple <-> SID string) and its prefix trie.

An SID is a string of one token per level, e.g. ``<a_3><b_12><c_0>`` for items
or ``<u_a_3><u_b_12>`` for users (token family prefix ``"u_"``).

:class:`PrefixTrie` stores the set of valid code tuples as level-wise dense
transition tables so that constrained beam search can mask and advance all
beams of a batch with tensor indexing (no Python loop over beams).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch

LEVEL_LETTERS = "abcdefgh"
INDEX_FILE = "index.parquet"
META_FILE = "index.json"
FORMAT_VERSION = 1
_PREFIX_RE = re.compile(r"[a-z]*_?")


@dataclass(eq=False)
class SIDIndex:
    """Row ``i`` maps ``entity_ids[i]`` to the code tuple ``codes[i]``."""

    entity_ids: list[str]
    codes: np.ndarray  # [n, L] int64, unique rows
    level_sizes: list[int]
    prefix: str = ""  # "" for items, "u_" for users
    _row: dict = field(init=False, repr=False, compare=False)
    _by_codes: dict = field(init=False, repr=False, compare=False)
    _token_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.entity_ids = [str(e) for e in self.entity_ids]
        codes = np.asarray(self.codes)
        if codes.ndim != 2:
            raise ValueError(f"codes must be a 2-D array [n, levels], got shape {codes.shape}")
        if codes.size and not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        self.codes = codes.astype(np.int64, copy=False)
        self.level_sizes = [int(s) for s in self.level_sizes]
        n, L = self.codes.shape
        if len(self.entity_ids) != n:
            raise ValueError(f"{len(self.entity_ids)} entity ids but {n} code rows")
        if L < 1 or L > len(LEVEL_LETTERS):
            raise ValueError(f"an SID needs 1..{len(LEVEL_LETTERS)} levels, got {L}")
        if len(self.level_sizes) != L:
            raise ValueError(f"level_sizes has {len(self.level_sizes)} entries but codes have {L} levels")
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(f"token prefix {self.prefix!r} must be lowercase letters with an optional '_' (e.g. 'u_')")
        for lvl, size in enumerate(self.level_sizes):
            if size < 1:
                raise ValueError(f"level {lvl} size must be >= 1, got {size}")
            col = self.codes[:, lvl]
            if n and (col.min() < 0 or col.max() >= size):
                raise ValueError(f"level {lvl} codes must lie in [0, {size}), got [{col.min()}, {col.max()}]")

        self._row = {}
        dup_ids = []
        for i, e in enumerate(self.entity_ids):
            if e in self._row:
                dup_ids.append(e)
            self._row[e] = i
        if dup_ids:
            raise ValueError(f"duplicate entity ids: {_preview(sorted(set(dup_ids)))}")

        self._by_codes = {}
        clashes: dict[tuple, list[str]] = {}
        for i, row in enumerate(self.codes.tolist()):
            key = tuple(row)
            j = self._by_codes.setdefault(key, i)
            if j != i:
                clashes.setdefault(key, [self.entity_ids[j]]).append(self.entity_ids[i])
        if clashes:
            groups = [f"{self._sid_of_codes(k)}: {', '.join(v)}" for k, v in list(clashes.items())[:5]]
            more = f" (+{len(clashes) - 5} more groups)" if len(clashes) > 5 else ""
            raise ValueError(
                f"{len(clashes)} SIDs are shared by several entities (codes must be unique; "
                f"resolve collisions first): {'; '.join(groups)}{more}"
            )
        self._token_re = re.compile("<" + re.escape(self.prefix) + r"([a-h])_(\d+)>")

    # -- tokens
    @property
    def num_levels(self) -> int:
        return int(self.codes.shape[1])

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def __contains__(self, entity_id) -> bool:
        """Whether ``entity_id`` (compared as a string) has a SID in this index."""
        return str(entity_id) in self._row

    def token(self, level: int, code: int) -> str:
        if not 0 <= level < self.num_levels:
            raise IndexError(f"level {level} out of range [0, {self.num_levels})")
        if not 0 <= code < self.level_sizes[level]:
            raise IndexError(f"code {code} out of range [0, {self.level_sizes[level]}) at level {level}")
        return f"<{self.prefix}{LEVEL_LETTERS[level]}_{int(code)}>"

    def tokens(self) -> list[str]:
        """Every token of every level, level-major then code order."""
        return [f"<{self.prefix}{LEVEL_LETTERS[l]}_{c}>" for l, size in enumerate(self.level_sizes) for c in range(size)]

    def token_offset(self, level: int) -> int:
        """Position of ``level``'s first token in :meth:`tokens`."""
        if not 0 <= level <= self.num_levels:
            raise IndexError(f"level {level} out of range [0, {self.num_levels}]")
        return int(sum(self.level_sizes[:level]))

    def _sid_of_codes(self, codes: Sequence[int]) -> str:
        return "".join(f"<{self.prefix}{LEVEL_LETTERS[l]}_{int(c)}>" for l, c in enumerate(codes))

    # -- lookups
    def sid(self, row: int) -> str:
        return self._sid_of_codes(self.codes[row])

    def sids(self) -> list[str]:
        return [self._sid_of_codes(r) for r in self.codes.tolist()]

    def row_of(self, entity_id) -> int:
        try:
            return self._row[str(entity_id)]
        except KeyError:
            kind = "user" if self.prefix.startswith("u") else "item"
            raise KeyError(f"unknown {kind} id {entity_id!r}: not in the SID index ({len(self)} entities)") from None

    def sid_of(self, entity_id) -> str:
        return self.sid(self.row_of(entity_id))

    def parse(self, sid: str) -> Optional[tuple[int, ...]]:
        """Codes of an SID string (whitespace between tokens allowed); ``None`` if malformed or unknown."""
        if not isinstance(sid, str):
            return None
        matches = list(self._token_re.finditer(sid))
        if len(matches) != self.num_levels:
            return None
        if self._token_re.sub("", sid).strip():
            return None  # stray text
        codes = []
        for lvl, m in enumerate(matches):
            if m.group(1) != LEVEL_LETTERS[lvl]:
                return None
            codes.append(int(m.group(2)))
        key = tuple(codes)
        return key if key in self._by_codes else None

    def entity_for_codes(self, codes: Sequence[int]) -> Optional[str]:
        row = self._by_codes.get(tuple(int(c) for c in codes))
        return None if row is None else self.entity_ids[row]

    def row_for_codes(self, codes: Sequence[int]) -> Optional[int]:
        return self._by_codes.get(tuple(int(c) for c in codes))

    # -- tables & persistence
    def to_frame(self) -> pd.DataFrame:
        data = {"entity_id": pd.Series(self.entity_ids, dtype=object), "sid": self.sids()}
        for l in range(self.num_levels):
            data[f"c{l}"] = self.codes[:, l]
        return pd.DataFrame(data)

    def save(self, directory) -> Path:
        """Write ``index.parquet`` + ``index.json``; the directory is replaced as a whole (temp dir + rename)."""
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            self.to_frame().to_parquet(tmp / INDEX_FILE, index=False)
            meta = {
                "format_version": FORMAT_VERSION,
                "prefix": self.prefix,
                "level_sizes": self.level_sizes,
                "num_levels": self.num_levels,
                "num_entities": len(self),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            if target.exists():
                old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
                os.rmdir(old)
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory) -> "SIDIndex":
        d = Path(directory)
        if not (d / INDEX_FILE).is_file() or not (d / META_FILE).is_file():
            raise FileNotFoundError(f"{d}: no saved SID index ({INDEX_FILE} + {META_FILE}) found")
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{d / META_FILE}: unsupported SID index format {meta.get('format_version')!r}")
        df = pd.read_parquet(d / INDEX_FILE)
        L = int(meta["num_levels"])
        codes = df[[f"c{l}" for l in range(L)]].to_numpy(dtype=np.int64).reshape(len(df), L)
        return cls([str(e) for e in df["entity_id"].tolist()], codes, list(meta["level_sizes"]), meta["prefix"])

    def build_trie(self) -> "PrefixTrie":
        return PrefixTrie(self.codes, self.level_sizes)


def _preview(items: list[str], k: int = 10) -> str:
    more = f" (+{len(items) - k} more)" if len(items) > k else ""
    return ", ".join(items[:k]) + more


class PrefixTrie:
    """Valid code tuples as level-wise dense transition tables (``torch.long``).

    ``next_node[t]`` has shape ``[num_nodes[t], level_sizes[t]]``; its entry is the
    id of the child node at level ``t + 1`` or, at the last level, the entity row
    reached; ``-1`` where the code is not allowed. Level 0 has a single root node 0.
    Node ids at each level follow the lexicographic order of their prefixes.

    Memory: ``8 * sum_t num_nodes[t] * level_sizes[t]`` bytes, where
    ``num_nodes[t] <= min(n, prod(level_sizes[:t]))``; i.e. at most
    ``8 * n * sum(level_sizes)`` bytes (~200 MB for 100k items and four levels
    of 256 codes). Dense tables are fine up to ~100k entities; beyond that a
    sparse (CSR) layout would be needed.
    """

    def __init__(self, codes: np.ndarray, level_sizes: Sequence[int]):
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != len(level_sizes):
            raise ValueError(f"codes shape {codes.shape} does not match {len(level_sizes)} levels")
        self.level_sizes = [int(s) for s in level_sizes]
        n, L = codes.shape
        self.num_entities = n
        node = np.zeros(n, dtype=np.int64)  # node id of each row's prefix at the current level
        n_nodes = 1
        tables, counts = [], []
        for t in range(L):
            table = np.full((n_nodes, self.level_sizes[t]), -1, dtype=np.int64)
            if t < L - 1:
                if n:
                    _, child = np.unique(codes[:, : t + 1], axis=0, return_inverse=True)
                    child = child.reshape(-1).astype(np.int64)
                    n_child = int(child.max()) + 1
                else:
                    child, n_child = np.zeros(0, dtype=np.int64), 0
            else:
                child, n_child = np.arange(n, dtype=np.int64), n
            table[node, codes[:, t]] = child
            tables.append(torch.from_numpy(table))
            counts.append(n_nodes)
            node, n_nodes = child, n_child
        self.next_node: list[torch.Tensor] = tables
        self.num_nodes: list[int] = counts

    @property
    def num_levels(self) -> int:
        return len(self.next_node)

    @property
    def device(self) -> torch.device:
        return self.next_node[0].device

    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.next_node))

    def root(self, batch: int) -> torch.LongTensor:
        """``[batch]`` root node ids (all zero) on the trie's device."""
        return torch.zeros(batch, dtype=torch.long, device=self.device)

    def allowed(self, level: int, nodes: torch.LongTensor) -> torch.BoolTensor:
        """``[..., level_sizes[level]]`` mask of allowed codes; nodes ``< 0`` (dead) allow nothing."""
        table = self.next_node[level]
        nodes = nodes.to(table.device)
        valid = nodes >= 0
        rows = table[nodes.clamp_min(0)]
        return (rows >= 0) & valid.unsqueeze(-1)

    def advance(self, level: int, nodes: torch.LongTensor, codes: torch.LongTensor) -> torch.LongTensor:
        """Child node ids (entity rows at the last level); ``-1`` for disallowed codes or dead nodes."""
        table = self.next_node[level]
        nodes = nodes.to(table.device)
        codes = codes.to(table.device)
        ok = (nodes >= 0) & (codes >= 0) & (codes < table.shape[1])
        out = table[nodes.clamp_min(0), codes.clamp(0, table.shape[1] - 1)]
        return torch.where(ok, out, torch.full_like(out, -1))

    def to(self, device) -> "PrefixTrie":
        """Move the tables to ``device`` in place; returns ``self``."""
        self.next_node = [t.to(device) for t in self.next_node]
        return self


__all__ = ["LEVEL_LETTERS", "PrefixTrie", "SIDIndex"]
