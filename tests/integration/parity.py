"""Reference runs through transformers and the token-exact comparison with its tie rule."""

from __future__ import annotations

import torch
from transformers import DynamicCache

TIE_GAP = 1e-4  # float32 top-2 logprob gap under which batching may legitimately flip greedy choice


def solo_generate(loaded, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """The request alone through transformers: ``generate``, or its greedy loop when EOS is ignored.

    ``generate`` can't ignore EOS the way serving engines do (``min_new_tokens`` suppresses
    EOS instead of letting it through), so that case runs the same greedy loop by hand.
    """
    model = loaded.model
    input_ids = torch.tensor([prompt_ids], device=loaded.device)
    with torch.inference_mode():
        if not ignore_eos:
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones_like(input_ids))
            return out[0, len(prompt_ids):].tolist()
        cache = DynamicCache(config=model.config)
        tokens, step_input = [], input_ids
        for _ in range(max_new_tokens):
            logits = model(input_ids=step_input, past_key_values=cache, use_cache=True).logits[0, -1]
            tokens.append(int(logits.argmax()))
            step_input = torch.tensor([[tokens[-1]]], device=loaded.device)
        return tokens


def top2_gap(loaded, token_ids: list[int]) -> float:
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([token_ids], device=loaded.device)).logits[0, -1]
    top = torch.log_softmax(logits.float(), -1).topk(2).values
    return float(top[0] - top[1])


def assert_same_greedy(loaded, prompt_ids: list[int], got: list[int], want: list[int]) -> None:
    """Token-identical, except a divergence proven to be a float tie at its first position."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            gap = top2_gap(loaded, prompt_ids + want[:i])
            assert gap < TIE_GAP, (f"diverged at token {i}: got {a}, want {b}; top-2 gap {gap:.2e} "
                                   f"is not a tie (got {got}, want {want})")
            return
    assert len(got) == len(want), f"length differs: got {len(got)}, want {len(want)}"
