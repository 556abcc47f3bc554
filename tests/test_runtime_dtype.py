"""model.dtype: auto picks bfloat16 only where the hardware computes it natively; an explicit dtype is obeyed."""
import logging
import math

import pytest
import torch

from sidrec import runtime
from sidrec.config import load_config, parse_config
from sidrec.runtime import compute_dtype, cpu_bf16_slowdown, dtype_named

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture
def slowdown(monkeypatch):
    """Pretend this CPU's bfloat16 matmul takes ``x`` times the float32 one; forget the warning already given."""
    monkeypatch.setattr(runtime, "_WARNED", set())

    def set_to(x):
        monkeypatch.setattr(runtime, "_BF16_SLOWDOWN", [x])

    return set_to


def test_auto_takes_bfloat16_only_where_the_cpu_computes_it_natively(slowdown):
    slowdown(130.0)  # AVX2 only: emulated, measured 1.1 vs 149 GFLOP/s on such a machine
    assert dtype_named("auto") == torch.float32
    slowdown(0.6)  # native bfloat16 (AVX512-BF16 / AMX)
    assert dtype_named("auto") == torch.bfloat16
    slowdown(runtime.BF16_SLOWDOWN_LIMIT)  # the limit itself still counts as native
    assert dtype_named("auto") == torch.bfloat16


def test_an_explicit_dtype_is_obeyed_and_a_slow_bfloat16_is_named_once(slowdown, caplog):
    slowdown(130.0)
    assert dtype_named("float32") == torch.float32
    with caplog.at_level(logging.WARNING, logger="sidrec"):
        assert dtype_named("bfloat16") == torch.bfloat16
        assert dtype_named("bfloat16") == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "model.dtype" in r.getMessage()]
    assert len(warned) == 1 and "130x slower than float32" in warned[0] and "model.dtype: auto" in warned[0]
    slowdown(0.6)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sidrec"):
        assert dtype_named("bfloat16") == torch.bfloat16
    assert not caplog.records
    with pytest.raises(ValueError, match="model.dtype: unknown value 'float16'"):
        dtype_named("float16")


def test_the_probe_measures_this_cpu_once_and_auto_follows_it(monkeypatch):
    monkeypatch.setattr(runtime, "_BF16_SLOWDOWN", [])
    first = cpu_bf16_slowdown()
    assert math.isfinite(first) and first > 0
    assert cpu_bf16_slowdown() == first  # measured once per process
    want = torch.bfloat16 if first <= runtime.BF16_SLOWDOWN_LIMIT else torch.float32
    assert dtype_named("auto", "cpu") == want


def test_configs_default_to_auto_and_compute_dtype_resolves_it(slowdown):
    assert load_config(REPO / "configs" / "quickstart.yaml").model.dtype == "auto"
    cfg = parse_config({"name": "t", "data": {"path": "x"}, "model": {"device": "cpu"}}, "inline")
    assert cfg.model.dtype == "auto"  # the default
    slowdown(50.0)
    assert compute_dtype(cfg) == torch.float32
    slowdown(1.0)
    assert compute_dtype(cfg) == torch.bfloat16
    f32 = parse_config({"name": "t", "data": {"path": "x"}, "model": {"device": "cpu", "dtype": "float32"}}, "inline")
    assert compute_dtype(f32) == torch.float32
