"""Per-row attention: a row's logits are bit-identical to the row run alone (tiny int8 model).

int8 linear layers are exact per row (integer sums), so attention is the only place where
batching could change a row's bits; float32 GEMMs pick their blocking by batch size.

The reference is the ``generate`` shape of work: the prompt in one forward, then one token
per forward with a ``DynamicCache``. Batched rows are left-padded beside longer and shorter
neighbours, swapped out and back in, and a recompute re-prefills outputs as replayed tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Gemma2Config, LlamaConfig, MistralConfig

from baton_sidecar import row_attention
from baton_sidecar.engine.runner import ModelRunner
from tiny import random_prompts


@pytest.fixture(scope="module")
def loaded(tiny_int8_model):
    return tiny_int8_model


def alone(model, prompt: list[int], outputs: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt and after each output token, one forward per token."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        step = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        logits = [step.logits[0, -1]]
        for token in outputs:
            step = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            logits.append(step.logits[0, -1])
    return logits


def test_batched_rows_equal_rows_alone_bit_for_bit(loaded):
    prompts = random_prompts(4, 2, 30, seed=5)
    runner = ModelRunner(loaded)
    assert runner.per_row_attention
    ids = [f"r{i}" for i in range(4)]
    first = runner.prefill(ids[:3], prompts[:3])  # left-padded together
    runner.embed(first, [0, 1, 2], [7, 8, 9])
    got = {rid: [first.last_logits[i]] for i, rid in enumerate(ids[:3])}
    fed = {rid: [t] for rid, t in zip(ids, [7, 8, 9])}
    for step in range(6):
        if step == 2:  # a newcomer joins the running batch
            late = runner.prefill(ids[3:], prompts[3:])
            runner.embed(late, [0], [10])
            got[ids[3]], fed[ids[3]] = [late.last_logits[0]], [10]
        if step == 4:  # a row leaves for host memory and comes back
            runner.swap_in("r1", runner.swap_out("r1"))
        logits = runner.decode()
        tokens = [int(t) for t in logits.argmax(-1)]
        for row, rid in enumerate(runner.row_ids):
            got[rid].append(logits[row])
            fed[rid].append(tokens[row])
        runner.set_next_tokens(tokens)
    for rid, prompt in zip(ids, prompts):
        want = alone(loaded.model, prompt, fed[rid][:-1])
        assert len(want) == len(got[rid])
        for a, b in zip(got[rid], want):
            assert torch.equal(a, b)


def test_recompute_replay_equals_the_decode_steps_it_replaces(loaded):
    prompt, outputs = random_prompts(1, 150, 150, seed=9)[0], list(range(11, 41))
    runner = ModelRunner(loaded)
    short = random_prompts(1, 3, 3, seed=10)[0]
    # Re-prefilled beside a shorter prompt: prompt + outputs, the outputs replayed one by one.
    prefilled = runner.prefill(["long", "short"], [prompt + outputs, short], replayed=[len(outputs), 0])
    assert torch.equal(prefilled.last_logits[0], alone(loaded.model, prompt, outputs)[-1])
    assert torch.equal(prefilled.last_logits[1], alone(loaded.model, short, [])[-1])


@pytest.mark.parametrize("config, refusal, pack_refusal", [
    (MistralConfig(sliding_window=16), None, None),  # windows are Baton's masks: served and packed
    (Gemma2Config(), None, "attention logit soft-capping"),
    (LlamaConfig(), None, None),
    ("state-space", "linear_attention layers", None),
])
def test_what_batons_attention_can_express(config, refusal, pack_refusal):
    if config == "state-space":
        config = LlamaConfig()
        config.layer_types = ["full_attention", "linear_attention"]
    config._attn_implementation = row_attention.NAME
    assert (row_attention.refusal(config) or "").startswith(refusal or "")
    assert (row_attention.refusal(config) is None) == (refusal is None)
    assert row_attention.pack_refusal(config) == pack_refusal
