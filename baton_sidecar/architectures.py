"""What Baton needs of a model's architecture, found by asking the model itself.

Baton keeps one dense K/V tensor per layer for the running batch (``engine/kv_cache``), so it
needs every layer's K/V shape. Configs name these differently (``num_key_value_heads``,
``n_head``, ``multi_query``...), so the shape is measured instead: a one-token forward into a
fresh cache, whose layers then hold ``[1, H_kv, 1, D]`` keys. A model that keeps no such
cache (state-space or recurrent layers) is refused here, by name, at load.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from . import row_attention

GEOMETRY = "_baton_kv_geometry"  # model attribute: the measured (layers, kv heads, head dim)


class UnsupportedModel(ValueError):
    """The model loads in transformers but Baton cannot serve it; the message names the feature."""


def full_cache() -> DynamicCache:
    """A cache that keeps every layer's every token. ``DynamicCache(config=...)`` would make
    sliding-window layers drop old tokens, and a prompt's layers would differ in length;
    Baton's masks apply the windows instead (``attention_masks``)."""
    return DynamicCache()


def kv_geometry(model: nn.Module, device: torch.device) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of the model's attention cache, measured once per model."""
    cached = getattr(model, GEOMETRY, None)
    if cached is not None:
        return cached
    cache = full_cache()
    with torch.inference_mode():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), past_key_values=cache, use_cache=True)
    layers = getattr(cache, "layers", [])
    shapes = {tuple(layer.keys.shape) for layer in layers if getattr(layer, "keys", None) is not None}
    if not shapes:
        raise UnsupportedModel("it keeps no attention K/V cache (state-space or recurrent layers)")
    if len(shapes) > 1 or len(shapes | {tuple(layer.values.shape) for layer in layers}) > 1:
        raise UnsupportedModel("its layers' K/V shapes differ (Baton's batch cache is one shape for all layers)")
    _, kv_heads, _, head_dim = shapes.pop()
    geometry = (len(layers), kv_heads, head_dim)
    setattr(model, GEOMETRY, geometry)
    return geometry


def check_servable(model: nn.Module, device: torch.device) -> None:
    """Raise ``UnsupportedModel`` naming what Baton cannot serve in ``model``; else return."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModel("it is an encoder-decoder model (Baton serves decoder-only causal LMs)")
    reason = row_attention.refusal(model.config)
    if reason is not None:
        raise UnsupportedModel(f"it has {reason}")
    if not row_attention.install(model):
        raise UnsupportedModel(f"its {model.config._attn_implementation} attention cannot take Baton's masks")
    kv_geometry(model, device)
    if not _is_causal(model, device):
        raise UnsupportedModel("its attention is not causal (a later token changed an earlier token's logits)")


def _is_causal(model: nn.Module, device: torch.device) -> bool:
    """Whether the first position's logits ignore the second token (BERT-style ``LMHead``
    models load as causal LMs but attend both ways unless configured as decoders)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[1, 2], [1, 3]], device=device)).logits[:, 0]
    return torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def attention_implementation(model_class) -> str:
    """``sdpa`` where the model supports it; else ``eager`` (Gemma 2: sdpa has no soft-capping)."""
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
