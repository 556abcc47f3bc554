"""The LLM and the baselines are scored on the same (sampled) users."""
from __future__ import annotations

import numpy as np

from sidrec.config import DataConfig
from sidrec.data.dataset import load_dataset
from sidrec.evaluation.evaluate import _sample, lift_table
from sidrec.index.sid_index import SIDIndex
from sidrec.data.tasks import eval_rows


def test_sampled_users_match_between_llm_rows_and_baseline_split(ml100k_dir):
    ds = load_dataset(DataConfig(format="recbole", path=str(ml100k_dir), max_users=200))
    n = len(ds.items)
    index = SIDIndex(entity_ids=ds.items["item_id"].tolist(), codes=np.stack([np.arange(n) % 7, np.arange(n)], 1),
                     level_sizes=[7, n])
    for part in ("valid", "test"):
        llm = _sample(eval_rows(ds, index, part, 20, 10), 50, seed=3)
        base = _sample(ds.split(part, 50), 50, seed=3)
        assert len(llm) == 50 and llm["user_id"].tolist() == base["user_id"].tolist()
        assert llm["target_item"].tolist() == base["target"].tolist()


def test_lift_table_shows_losing_as_negative():
    m = {"test/recall_at_10": 0.05, "baseline/sasrec/test/recall_at_10": 0.10, "baseline/popularity/test/recall_at_10": 0.04}
    t = lift_table(m, ks=(10,))
    row = t.iloc[0]
    assert row["lift_vs_sasrec"] == -0.5 and row["lift_vs_popularity"] > 0
