"""Baton's attention function: per-layer masks, per-row attention (int8) and packed steps.

Installed on every model Baton serves (``install``), over the attention the model was loaded
with: ``sdpa``, or ``eager`` for models ``sdpa`` cannot run (Gemma 2's logit soft-capping).
It applies each layer's sliding window to the batch's mask (``attention_masks``); without
Baton's keyword arguments it is otherwise the base function, so ``generate`` is unchanged.
Packed steps (``engine/packed.py``) run only over ``sdpa`` without soft-capping (``packs``).

Per-row attention: each row of a batch attends over exactly its own tokens, as if alone.

Batched attention over the left-padded cache reduces a row's softmax and weighted sum over
all ``L`` live columns, its own tokens placed after the padding. The kernel's reduction order
depends on ``L`` and on where the tokens sit, so the row's output differs from the row run
alone in the last bits. In float32 that is harmless (greedy parity holds up to float ties),
but int8 activations (``quantization.py``) round that noise to a whole quantization step at
the next layer, and greedy output drifts: 7 of 16 staggered requests differed from
``generate`` on the same int8 model, 0 of 16 with this.

So, with int8, each row calls the very function ``transformers`` runs for a request alone
(``sdpa``, no mask) on views of its own columns: bit-identical to the row alone, whatever is
batched beside it. The cost is one attention call per row and layer instead of one per layer;
linear layers dominate a CPU decode step, and padding columns are no longer computed.

A recompute preemption re-prefills a request's outputs; each is computed alone over its
prefix, as the decode step that first computed it did, so the resumed output is exact too.

The rows' lengths arrive in the forward's keyword arguments (``ROW_LENGTHS``, one list per
step from the runner). Without them (a reference ``generate``, a chunked prefill whose queries
follow earlier chunks) this is plain ``sdpa`` with the mask it is given; a prompt chunked by the
prefill budget is therefore not bit-identical to ``generate``'s one-pass prefill.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

from .attention_masks import additive, windowed

NAME = "baton_per_row"  # over sdpa
NAME_EAGER = "baton_eager"  # over the model's own eager attention
ROW_LENGTHS = "baton_row_lengths"  # forward kwarg: real tokens per row, queries included (0 = dummy row)
ROW_REPLAYED = "baton_row_replayed"  # prefill kwarg: trailing tokens per row that decode steps computed
PACKED = "baton_packed"  # forward kwarg: a packed step's cache (``engine/packed.py``), which attends itself
ROWS_ALONE = "_baton_rows_alone"  # model attribute: decode rows attend alone (set by ``install``)


def per_row_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """``query [B, H, Q, D]``, ``key``/``value [B, H_kv, L, D]`` -> ``([B, Q, H, D], None)``.

    Rows are left-padded: row ``b``'s tokens are its last ``n_b`` columns. A decode step
    (``Q == 1``) computes each row's one query over its tokens. A prefill (``Q == L``) computes
    a row's tokens as ``generate`` did: the prompt in one causal pass, then each replayed token
    (``ROW_REPLAYED``: the outputs a recompute preemption re-prefills) alone over its prefix,
    as its decode step did. Padding queries and dummy rows come out zero.
    """
    packed = kwargs.pop(PACKED, None)
    if packed is not None:  # a packed step: decode rows and prompt segments, each over its own keys
        return packed.attend(module, query, **kwargs), None
    lengths: list[int] | None = kwargs.pop(ROW_LENGTHS, None)
    replayed: list[int] | None = kwargs.pop(ROW_REPLAYED, None)
    q_len, kv_len = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    if lengths is None or window or (q_len > 1 and q_len != kv_len):
        attention_mask = windowed(attention_mask, window, q_len, kv_len, query.device)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def alone(row: int, queries: slice, keys: slice) -> torch.Tensor:  # [1, len(queries), H, D]
        return sdpa_attention_forward(module, query[row:row + 1, :, queries], key[row:row + 1, :, keys],
                                      value[row:row + 1, :, keys], None, **kwargs)[0]

    if q_len == 1:  # a decode step: each row's one query over its tokens, concatenated
        dummy = query.new_zeros(1, 1, query.shape[1], query.shape[3])
        return torch.cat([alone(row, slice(0, 1), slice(kv_len - n, kv_len)) if n else dummy
                          for row, n in enumerate(lengths)]), None
    out = query.new_zeros(query.shape[0], q_len, query.shape[1], query.shape[3])
    for row, n in enumerate(lengths):  # a prefill (Q == L): query i sits at column i
        first, causal_end = kv_len - n, kv_len - (replayed[row] if replayed else 0)
        if causal_end > first:  # its prompt in one causal pass, as generate's
            out[row:row + 1, first:causal_end] = alone(row, slice(first, causal_end), slice(first, causal_end))
        for column in range(max(causal_end, first), kv_len):  # replayed outputs, as their decode steps
            out[row:row + 1, column:column + 1] = alone(row, slice(column, column + 1), slice(first, column + 1))
    return out, None


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own eager attention (soft-capping and all), with the batch's bool mask made
    additive and each layer's window applied. Shapes as ``per_row_attention``."""
    kwargs.pop(ROW_LENGTHS, None), kwargs.pop(ROW_REPLAYED, None)
    mask = windowed(attention_mask, kwargs.get("sliding_window"), query.shape[2], key.shape[2], query.device)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, additive(mask, query.dtype), **kwargs)


AttentionInterface.register(NAME, per_row_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # masks for the calls that fall back to sdpa
AttentionInterface.register(NAME_EAGER, eager_attention)
AttentionMaskInterface.register(NAME_EAGER, eager_mask)

LAYER_TYPES = {"full_attention", "sliding_attention"}
BASES = {"sdpa": NAME, "eager": NAME_EAGER}


def refusal(config) -> str | None:
    """None if Baton's masks can express every layer's attention; else the layer kind it cannot."""
    unknown = set(getattr(config, "layer_types", None) or ()) - LAYER_TYPES
    if unknown:
        return f"{sorted(unknown)[0]} layers (Baton masks full and sliding-window attention only)"
    return None


def pack_refusal(config) -> str | None:
    """None if prompts can be packed with decode rows (``packed.py`` is sdpa, without soft-capping)."""
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    if config._attn_implementation != NAME:
        return "eager attention (the model does not run on sdpa)"
    return None


def install(model: nn.Module, rows_alone: bool = False) -> bool:
    """Switch ``model`` to Baton's attention over its own (sdpa or eager); True if it is on.

    Installed, the model runs its base attention unless a forward passes ``ROW_LENGTHS`` or
    ``PACKED``. ``rows_alone``: the engine's decode rows attend alone (int8, over sdpa only).
    Idempotent; ``rows_alone`` once set stays set.
    """
    if not installed(model):
        base = BASES.get(model.config._attn_implementation)
        if base is None or refusal(model.config) is not None:
            return False
        model.set_attn_implementation(base)
    if rows_alone and model.config._attn_implementation == NAME:
        setattr(model, ROWS_ALONE, True)
    return True


def installed(model: nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) in BASES.values()


def packs(model: nn.Module) -> bool:
    """Whether the model's prompts can run packed with decode rows."""
    return installed(model) and pack_refusal(model.config) is None


@contextlib.contextmanager
def plain_attention(model: nn.Module):
    """Run ``model`` on transformers' own ``sdpa`` meanwhile (code that accepts only its own
    implementations, such as its continuous batching)."""
    if not installed(model):
        yield model
        return
    current = model.config._attn_implementation
    model.set_attn_implementation(next(base for base, name in BASES.items() if name == current))
    try:
        yield model
    finally:
        model.set_attn_implementation(current)


def rows_attend_alone(model: nn.Module) -> bool:
    return installed(model) and getattr(model, ROWS_ALONE, False)
