"""Packed steps: prompt parts and decode rows in one forward, each part over its own keys.

With rows attending alone (tiny int8 model) a packed step is bit-identical to the work done
apart: a prompt prefilled in chunks of any size, packed beside other prompts and beside decode
rows, gives ``generate``'s one-pass logits and K/V, and the decode rows give the logits of an
unpacked decode step. In float32 the same holds to rounding (GEMM blocking follows the
number of packed tokens).
"""

from __future__ import annotations

import types

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from baton_sidecar import row_attention
from baton_sidecar.engine.packed import PackedCache, PromptKV, QueryPiece, Segment, causal_mask, query_pieces
from baton_sidecar.engine.runner import ModelRunner, PromptPart
from tiny import random_prompts, tiny_loaded_model


@pytest.fixture(scope="module")
def float_loaded():
    loaded = tiny_loaded_model(seed=4)
    assert row_attention.install(loaded.model)
    return loaded


def one_pass(model, tokens: list[int]) -> tuple[torch.Tensor, DynamicCache]:
    """``generate``'s prefill: the whole prompt in one forward; its last logits and cache."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True)
    return out.logits[0, -1], cache


def in_parts(runner: ModelRunner, rid: str, tokens: list[int], sizes: list[int], decode: bool = False):
    """Prefill ``tokens`` in parts of ``sizes`` through packed steps; the last part's output."""
    start, outputs = 0, []
    for size in sizes:
        stop = min(start + size, len(tokens))
        part = PromptPart(rid, tokens[start:stop], start, len(tokens), len(tokens), last=stop == len(tokens))
        outputs.append(runner.run_packed([part], decode=decode))
        start = stop
    assert start == len(tokens)
    return outputs


def test_causal_mask_sees_each_querys_prefix():
    mask = causal_mask(start=2, queries=3, keys=6, device=torch.device("cpu"))[0, 0]
    assert mask.tolist() == [[True, True, True, False, False, False],
                             [True, True, True, True, False, False],
                             [True, True, True, True, True, False]]


@pytest.mark.parametrize("sizes", [[40], [16, 3, 21], [7, 13, 20], [16, 16, 8], [3, 37], [4] * 10])
def test_chunk_boundaries_never_change_a_bit(tiny_int8_model, sizes):
    prompt = random_prompts(1, 40, 40, seed=11)[0]
    want_logits, want_cache = one_pass(tiny_int8_model.model, prompt)
    runner = ModelRunner(tiny_int8_model)
    prefilled = in_parts(runner, "p", prompt, sizes)[-1].prefilled[0]
    assert torch.equal(prefilled.last_logits[0], want_logits)
    for layer, reference in zip(range(len(prefilled.keys)), want_cache.layers):
        assert torch.equal(prefilled.keys[layer], reference.keys)
        assert torch.equal(prefilled.values[layer], reference.values)
    assert not runner.prompts and runner.prefilled_tokens("p") is None


# Chunks of 33-35 tokens, and prompts of 33-35 or 65-67 tokens cut before their last 1-3
# (a 1-3-row query block in generate's one call, 32-row blocks): the kernel reduces 1-3-row
# blocks another way, so each query must land in a block of its size class there.
SHORT_BLOCKS = [(40, [33, 7]), (40, [34, 6]), (40, [35, 5]), (80, [35, 35, 10]), (33, [16, 17]), (34, [16, 18]),
                (35, [19, 16]), (35, [16, 16, 3]), (35, [34, 1]), (65, [16, 16, 16, 17]), (66, [40, 26]),
                (67, [64, 3]), (67, [33, 34]), (67, [66, 1])]


def test_query_pieces_follow_generates_query_blocks():
    assert query_pieces(0, 35, 35) == [QueryPiece(0, 32), QueryPiece(32, 3, lead=32)]
    assert query_pieces(19, 35, 35) == [QueryPiece(19, 13), QueryPiece(32, 3, lead=32)]
    assert query_pieces(33, 35, 35) == [QueryPiece(33, 2, lead=32, pad=1)]  # the short block, whole
    assert query_pieces(0, 33, 40) == [QueryPiece(0, 33, pad=3)]  # no 1-row block of its own
    assert query_pieces(38, 40, 40) == [QueryPiece(38, 2, pad=2)]
    assert query_pieces(0, 2, 2) == [QueryPiece(0, 2)]  # a 2-token prompt: generate's call is alone too
    assert query_pieces(0, 193, 193) == [QueryPiece(0, 192), QueryPiece(192, 1, lead=32)]  # 64-row blocks
    assert query_pieces(0, 225, 225) == [QueryPiece(0, 225)]  # 225 = 3 * 64 + 33: no short block


def segment_attention(length: int, sizes: list[int], heads: int = 9, kv_heads: int = 3, dim: int = 64):
    """Random prompt attention (SmolLM2's shapes): ``generate``'s one call, and the packed
    path's over chunks of ``sizes`` (rows attending alone); both ``[1, length, H, D]``."""
    torch.manual_seed(length)
    module = types.SimpleNamespace(layer_idx=0, scaling=dim ** -0.5, num_key_value_groups=heads // kv_heads,
                                   is_causal=True)
    query = torch.randn(1, length, heads, dim).transpose(1, 2)  # as the model's: [1, H, T, D], a view
    kv = PromptKV(1, kv_heads, dim, length, torch.float32, torch.device("cpu"), zeroed=True)
    kv.keys[0].normal_(), kv.values[0].normal_()
    want = sdpa_attention_forward(module, query, kv.keys[0], kv.values[0], None, scaling=module.scaling)[0]
    start, got = 0, []
    for size in sizes:
        stop = min(start + size, length)
        cache = PackedCache(None, 0, None, [Segment(kv, 0, start, stop - start, length)], rows_alone=[])
        got.append(cache.attend(module, query[:, :, start:stop], scaling=module.scaling))
        start = stop
    assert start == length
    return want, torch.cat(got, dim=1)


@pytest.mark.parametrize("length, sizes", SHORT_BLOCKS + [(35, [35]), (200, [100, 97, 3]), (260, [258, 2]),
                                                          (800, [400, 399, 1]), (1027, [512, 512, 3])])
def test_prompt_attention_in_chunks_is_generates_bit_for_bit(length, sizes):
    want, got = segment_attention(length, sizes)
    differ = (want != got).any(-1).any(-1)[0].nonzero().flatten().tolist()
    assert not differ, f"queries {differ} differ"


def layer_attention(model, run) -> list[torch.Tensor]:
    """Each layer's attention output (its ``o_proj`` input) over ``run()``'s forwards: ``[T, H * D]``."""
    seen = [[] for _ in model.model.layers]
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda _, args, i=i: seen[i].append(args[0][0]))
             for i, layer in enumerate(model.model.layers)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(parts) for parts in seen]


@pytest.mark.parametrize("length, sizes", SHORT_BLOCKS)
def test_short_query_blocks_attend_as_in_one_pass(tiny_int8_model, length, sizes):
    prompt = random_prompts(1, length, length, seed=length)[0]
    model, runner = tiny_int8_model.model, ModelRunner(tiny_int8_model)
    want = layer_attention(model, lambda: one_pass(model, prompt))
    got = layer_attention(model, lambda: in_parts(runner, "p", prompt, sizes))
    for layer, (w, g) in enumerate(zip(want, got)):
        assert torch.equal(w, g), f"layer {layer}: queries {(w != g).any(-1).nonzero().flatten().tolist()} differ"


def decode_steps(runner: ModelRunner, steps: int, packed_prompts: dict[int, list[PromptPart]] | None = None):
    """Decode ``steps`` times (greedy); at step i also run ``packed_prompts[i]`` in the same forward.
    Returns per step the rows' logits and the parts' outputs."""
    history = []
    for step in range(steps):
        parts = (packed_prompts or {}).get(step)
        if parts:
            out = runner.run_packed(parts, decode=True)
            logits = out.decode_logits
        else:
            logits, out = runner.decode(), None
        runner.set_next_tokens([int(t) for t in logits.argmax(-1)])
        history.append((logits, out))
    return history


def start_batch(runner: ModelRunner, prompts: list[list[int]]) -> None:
    ids = [f"r{i}" for i in range(len(prompts))]
    prefilled = runner.prefill(ids, prompts)
    runner.embed(prefilled, list(range(len(prompts))), [int(t) for t in prefilled.last_logits.argmax(-1)])


def test_decode_rows_fused_with_prompts_equal_a_plain_decode_bit_for_bit(tiny_int8_model):
    rows = random_prompts(3, 5, 25, seed=12)
    newcomer, other = random_prompts(2, 30, 30, seed=13)
    plain, fused = ModelRunner(tiny_int8_model), ModelRunner(tiny_int8_model)
    start_batch(plain, rows)
    start_batch(fused, rows)
    parts = {1: [PromptPart("n", newcomer[:12], 0, 30, 30, last=False), PromptPart("o", other, 0, 30, 30, last=True)],
             2: [PromptPart("n", newcomer[12:], 12, 30, 30, last=True)]}
    want = decode_steps(plain, 4)
    got = decode_steps(fused, 4, parts)
    for (want_logits, _), (got_logits, _) in zip(want, got):
        assert torch.equal(want_logits, got_logits)
    assert torch.equal(got[1][1].prefilled[1].last_logits[0], one_pass(tiny_int8_model.model, other)[0])
    assert torch.equal(got[2][1].prefilled[0].last_logits[0], one_pass(tiny_int8_model.model, newcomer)[0])


def test_replayed_outputs_in_a_packed_part_equal_their_decode_steps(tiny_int8_model):
    """A recompute preemption re-prefills prompt + outputs; the outputs replay one by one."""
    prompt, outputs = random_prompts(1, 20, 20, seed=14)[0], list(range(11, 21))
    reference = ModelRunner(tiny_int8_model)
    reference.embed(reference.prefill(["a"], [prompt]), [0], [outputs[0]])
    for token in outputs[1:]:
        reference.decode()
        reference.set_next_tokens([token])
    want = reference.decode()[0]  # logits after the last output
    runner = ModelRunner(tiny_int8_model)
    tokens = prompt + outputs
    for start, stop in ((0, 14), (14, 25), (25, 30)):
        part = PromptPart("a", tokens[start:stop], start, len(tokens), len(prompt), last=stop == len(tokens))
        out = runner.run_packed([part], decode=False)
    assert torch.equal(out.prefilled[0].last_logits[0], want)


def test_float_packed_step_matches_apart_to_rounding(float_loaded):
    rows = random_prompts(2, 5, 25, seed=15)
    newcomer = random_prompts(1, 33, 33, seed=16)[0]
    plain, fused = ModelRunner(float_loaded), ModelRunner(float_loaded)
    start_batch(plain, rows)
    start_batch(fused, rows)
    want = decode_steps(plain, 3)
    got = decode_steps(fused, 3, {0: [PromptPart("n", newcomer[:20], 0, 33, 33, last=False)],
                                  1: [PromptPart("n", newcomer[20:], 20, 33, 33, last=True)]})
    for (want_logits, _), (got_logits, _) in zip(want, got):
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1][1].prefilled[0].last_logits[0], one_pass(float_loaded.model, newcomer)[0],
                               rtol=1e-4, atol=1e-4)
