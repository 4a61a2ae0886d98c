"""Reference runs through transformers and the token-exact comparison with its tie rule."""

from __future__ import annotations

import torch

TIE_GAP = 1e-4  # float32 top-2 logprob gap under which batching may legitimately flip greedy choice


def solo_generate(loaded, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """The request alone through transformers' own greedy ``generate``."""
    model = loaded.model
    input_ids = torch.tensor([prompt_ids], device=loaded.device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(input_ids))
    if ignore_eos:
        kwargs.update(min_new_tokens=max_new_tokens)
    with torch.inference_mode():
        out = model.generate(input_ids, **kwargs)
    return out[0, len(prompt_ids):].tolist()


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
