"""Test environment: offline, quiet, and isolated ZenML/MLflow stores.

The environment variables are set before anything imports zenml or mlflow, so
every test session gets a fresh ZenML store in a temporary directory.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="sidrec-tests-"))
os.environ.setdefault("ZENML_CONFIG_PATH", str(_TMP / "zenml"))
os.environ.setdefault("SIDREC_HOME", str(_TMP / "home"))
os.environ.setdefault("SIDREC_PROGRESS", "0")
os.environ["ZENML_ANALYTICS_OPT_IN"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["ZENML_LOGGING_VERBOSITY"] = "WARN"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("GE_USAGE_STATISTICS_ENABLED", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ML100K = REPO / "data" / "ml-100k"
SCIENTIFIC = REPO.parent / "shared" / "data" / "amazon-scientific"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    if not (ML100K / "ml-100k.inter").is_file():
        pytest.fail(f"{ML100K} is missing: run `make fetch` (or `make test`, which fetches it) first")
    return ML100K


@pytest.fixture(scope="session")
def scientific_dir() -> Path:
    if not (SCIENTIFIC / "Scientific.text").is_file():
        pytest.skip(f"{SCIENTIFIC} not present (shared benchmark data lives beside the checkout)")
    return SCIENTIFIC
