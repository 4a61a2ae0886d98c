from __future__ import annotations

import math

import pytest
import torch

from baton_sidecar.engine.request import RequestValidationError, SamplingParams
from baton_sidecar.engine.sampler import RowSampler, sample

CPU = torch.device("cpu")


def samplers(*params):
    return [RowSampler(p, CPU) for p in params]


def test_greedy_takes_argmax_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    out = sample(logits, samplers(SamplingParams(temperature=0), SamplingParams(temperature=0)))
    assert [t.token_id for t in out] == [1, 0]


@pytest.mark.parametrize("temperature", [1e-6, 1e-38, 1e-45, 5e-324])
def test_a_temperature_too_cold_to_sample_is_greedy(temperature):
    """logits / 1e-38 overflows float32: every probability was NaN and the last id was drawn."""
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0], [2.0, -1.0, 1.5, 0.0]])
    params = SamplingParams(temperature=temperature, logprobs=1)
    assert params.greedy
    out = sample(logits, samplers(params, params))
    assert [t.token_id for t in out] == [1, 0]
    assert all(math.isfinite(t.logprob.logprob) for t in out)


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for seed in range(20):
        top_k = sample(logits, samplers(SamplingParams(temperature=1.0, top_k=1, seed=seed)))[0]
        assert top_k.token_id == 0
        nucleus = sample(logits, samplers(SamplingParams(temperature=1.0, top_p=0.7, seed=seed)))[0]
        assert nucleus.token_id in (0, 1)  # 0.5 + 0.3 reaches 0.7; 2 and 3 are cut


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-9])
def test_a_top_p_that_underflows_keeps_the_most_likely_token(top_p):
    """A top_p that is 0 in float32 dropped every token: NaN probabilities, an arbitrary draw."""
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0], [2.0, float("-inf"), 1.5, float("-inf")]])
    for seed in range(10):
        params = SamplingParams(temperature=1.0, top_p=top_p, seed=seed)
        assert [t.token_id for t in sample(logits.clone(), samplers(params, params))] == [1, 0]


def test_seeded_row_is_independent_of_its_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = SamplingParams(temperature=0.9, seed=1234)
    alone_sampler = samplers(params)
    crowd_samplers = samplers(SamplingParams(temperature=1.0), params, SamplingParams(temperature=0),
                              SamplingParams(temperature=1.3, seed=7))
    alone = [sample(logits[1:2], alone_sampler)[0].token_id for _ in range(30)]
    in_crowd = [sample(logits, crowd_samplers)[1].token_id for _ in range(30)]
    assert alone == in_crowd
    assert len(set(alone)) > 3  # really sampling, not a constant


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    sampler = samplers(SamplingParams(temperature=1.0, seed=3))
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[sample(logits, sampler)[0].token_id] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_logprobs_report_chosen_and_top_alternatives():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = sample(logits, samplers(SamplingParams(temperature=0, logprobs=2)))[0]
    expected = torch.log_softmax(logits, -1)[0]
    assert out.logprob.token_id == 2
    assert math.isclose(out.logprob.logprob, expected[2].item(), rel_tol=1e-6)
    assert [t for t, _ in out.logprob.top] == [2, 1]


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("logprobs", 21), ("seed", "x"), ("temperature", float("nan")),
    ("temperature", 10 ** 400), ("top_p", -10 ** 400),  # past the float range: no OverflowError
])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(RequestValidationError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field


def test_min_tokens_masks_stop_ids_inside_the_vocabulary_only():
    """A stop_token_ids entry past the logits never occurs; masking it indexed out of bounds."""
    from baton_sidecar.engine.logits import RowLogits, apply_processors

    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(3, 10 ** 6))
    rows = [RowLogits(params, [1], frozenset({3, 10 ** 6}), [], 8, CPU)]
    logits = torch.zeros(1, 8)
    logits[0, 3] = 5.0
    assert int(apply_processors(logits, rows).argmax()) != 3
    for _ in range(2):
        rows[0].advance(0)
    logits[0, 3] = 5.0
    assert int(apply_processors(logits, rows).argmax()) == 3  # min_tokens reached
