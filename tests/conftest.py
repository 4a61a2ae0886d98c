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


@pytest.fixture(scope="session")
def tiny_int8_model():
    """A tiny random model with int8 linear layers whose rows attend alone (as ``--quantization int8``)."""
    from baton_sidecar import quantization, row_attention
    from tiny import tiny_loaded_model

    loaded = tiny_loaded_model(seed=3)
    quantization.quantize(loaded.model, loaded.tokenizer)
    assert row_attention.install(loaded.model, rows_alone=True)
    return loaded
