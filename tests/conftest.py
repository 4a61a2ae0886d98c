"""Shared fixtures: the real embedded model is loaded once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct, the embedded default (cached conversion: a few seconds)."""
    from baton_sidecar.config import EngineConfig
    from baton_sidecar.model import load_model

    return load_model(EngineConfig(), progress=False)


@pytest.fixture(scope="session")
def int8_model():
    """The embedded default with int8 linear layers (quantized once, then from the cache)."""
    from baton_sidecar.config import EngineConfig
    from baton_sidecar.model import load_model

    return load_model(EngineConfig(quantization="int8"), progress=False)


@pytest.fixture(scope="session")
def tiny_model():
    from tiny import tiny_loaded_model

    return tiny_loaded_model()
