"""Tiny random models of the families users bring, built at test time (no download).

Each family's config is the library's own config class with tiny sizes; the weights are
random and the tokenizer is ``tiny.tiny_tokenizer``. ``save_family`` writes a complete
transformers directory, so a test loads it the way a user's ``--model DIR`` is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tiny import EOS_ID, VOCAB, tiny_tokenizer

WINDOW = 12  # sliding windows shorter than the test prompts, so they bind

COMMON = dict(vocab_size=VOCAB, eos_token_id=EOS_ID, pad_token_id=0, bos_token_id=EOS_ID, tie_word_embeddings=False)
ROTARY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)

# family -> (model_type, config kwargs)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", ROTARY),
    "qwen2": ("qwen2", ROTARY),
    "qwen2-swa": ("qwen2", ROTARY | dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
    "qwen3": ("qwen3", ROTARY | dict(head_dim=16)),
    "mistral": ("mistral", ROTARY | dict(sliding_window=None)),
    "mistral-swa": ("mistral", ROTARY | dict(sliding_window=WINDOW)),
    "gemma2": ("gemma2", ROTARY | dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16)),
    "gemma3": ("gemma3_text", ROTARY | dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                            layer_types=["sliding_attention", "full_attention"] * 2)),
    "phi3": ("phi3", ROTARY | dict(num_key_value_heads=4)),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=64, max_position_embeddings=512)),
    "gpt-neox": ("gpt_neox", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
                                  max_position_embeddings=512)),
    "qwen2-moe": ("qwen2_moe", ROTARY | dict(moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                             num_experts=4, num_experts_per_tok=2)),
    "mixtral": ("mixtral", ROTARY | dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "gpt-oss": ("gpt_oss", ROTARY | dict(intermediate_size=64, head_dim=16, num_local_experts=4,
                                         num_experts_per_tok=2, sliding_window=WINDOW)),
    "cohere2": ("cohere2", ROTARY | dict(sliding_window=WINDOW,
                                         layer_types=["sliding_attention"] * 3 + ["full_attention"])),
}


def build_family(family: str, seed: int = 0, spread: float = 8.0):
    model_type, kwargs = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **(COMMON | kwargs))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random init is near-uniform: spread the logits so greedy picks are not ties
        model.get_output_embeddings().weight.mul_(spread)
    return model


def save_family(family: str, directory: Path, seed: int = 0, spread: float = 8.0) -> Path:
    model = build_family(family, seed, spread)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
