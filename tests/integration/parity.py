"""Reference runs through transformers and the token-exact comparison with its tie rule."""

from __future__ import annotations

import asyncio

import torch
from transformers import DynamicCache

from baton_sidecar.engine import SamplingParams

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


# --- the workload the engine parity tests share ------------------------------------------

INSTRUCTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain, in two sentences, why the sky is blue.",
    "List three prime numbers greater than ten.",
    "Translate 'good morning' into Spanish and German.",
    "def fibonacci(n):",
    "Give me a short recipe for pancakes with bananas and honey, step by step.",
    "Summarise the plot of Romeo and Juliet for a ten-year-old reader who has never read Shakespeare.",
    "Hi",
    "What does HTTP status code 429 mean, and when should a server send it?",
    "Write a Python function that reverses a linked list, with comments.",
    "Name the planets of the solar system in order from the sun.",
    "Why do cats purr? Answer as a curious veterinarian would explain it to a new pet owner in detail.",
    "Compose a limerick about a programmer who never sleeps.",
    "What is 17 times 23?",
    "Describe the water cycle.",
]


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


async def run_staggered(engine, requests, gap_s=0.15):
    """Submit greedy ``(prompt_ids, max_tokens, priority)`` at staggered times; return their outputs."""
    async def one(index, prompt_ids, max_tokens, priority):
        await asyncio.sleep(index * gap_s)
        out = await engine.generate(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0),
                                    priority=priority)
        return out

    return await asyncio.gather(*[one(i, *r) for i, r in enumerate(requests)])


async def wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "engine did not reach the expected state"
        await asyncio.sleep(0.005)


async def collect(stream):
    """A stream's tokens, its preemption count and its event names, in order."""
    tokens, events, last = [], [], None
    async for out in stream:
        tokens.extend(out.token_ids)
        events.extend(name for name, _ in out.events)
        last = out
    return tokens, last.num_preemptions, events
