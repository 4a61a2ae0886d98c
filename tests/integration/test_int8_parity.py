"""The parity tests of ``test_engine_parity`` again, on the int8 model, against ``generate`` on
the same int8 model, with float32's tie rule. They do not hold yet, and say so (xfail).

The int8 linear layers are exactly row-independent (tests/engine/test_quantization.py), but
attention is not bit-exact across batch shapes (in float32 too: ~1e-7, well under the 1e-4 tie
rule), and rounding an activation to int8 turns a last-bit difference that straddles a rounding
boundary into a whole int8 step, which the following layers carry on. Measured: in the staggered
run, 6 of 16 requests diverge from ``generate`` alone, at top-2 logprob gaps of 0.06 to 0.59.
So ``--quantization int8`` trades batch-invariant greedy output for speed; the default is none.
"""

from __future__ import annotations

import pytest

import test_engine_parity as float_parity
from baton_sidecar.config import EngineConfig
from baton_sidecar.model import load_model
from baton_sidecar.quantization import Int8Linear
from parity import solo_generate

pytestmark = [pytest.mark.model, pytest.mark.xfail(
    reason="int8 activation rounding amplifies attention's last-bit batch noise (see the docstring)")]


@pytest.fixture(scope="module")
def int8_model():
    loaded = load_model(EngineConfig(quantization="int8"), progress=False)
    assert isinstance(loaded.model.get_output_embeddings(), Int8Linear)
    return loaded


@pytest.fixture(scope="module")
def workload(int8_model):
    return float_parity.workload.__wrapped__(int8_model)


@pytest.fixture(scope="module")
def references(int8_model, workload):
    return [solo_generate(int8_model, p, n) for p, n in workload]


async def test_staggered_requests_match_generate_alone(int8_model, workload, references):
    await float_parity.test_staggered_requests_match_transformers_alone(int8_model, workload, references, "rebatch")


@pytest.mark.parametrize("mode", ["swap", "recompute"])
async def test_preempted_requests_resume_with_identical_output(int8_model, workload, references, mode):
    await float_parity.test_preempted_requests_resume_with_identical_output(int8_model, workload, references, mode)


async def test_chunked_prefill_matches_generate(int8_model, workload):
    await float_parity.test_chunked_prefill_matches_transformers(int8_model, workload)
