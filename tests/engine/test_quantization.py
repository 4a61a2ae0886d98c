"""int8 linear layers: the private op they use, row independence, the cache (tiny model, no download)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_loaded_model

from baton_sidecar import model as model_module
from baton_sidecar import quantization
from baton_sidecar.config import EngineConfig, PolicyConfig
from baton_sidecar.engine.core import EngineCore
from baton_sidecar.quantization import Int8Linear


def test_int_mm_still_exists_and_is_exact_on_cpu() -> None:
    """``torch._int_mm`` is private: a torch upgrade that drops or changes it must fail here first."""
    assert hasattr(torch, "_int_mm"), "torch._int_mm is gone: baton_sidecar/quantization.py needs a new kernel"
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 576), generator=generator, dtype=torch.int8)
    b = torch.randint(-127, 128, (96, 576), generator=generator, dtype=torch.int8)
    got = torch._int_mm(a, b.t())
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), a.long() @ b.long().t())


def test_int8_linear_is_close_to_float_and_rows_are_independent() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    act_max = torch.rand(64) * 8 + 0.5
    q = Int8Linear.from_float(linear, act_max)
    x = torch.randn(3, 7, 64)  # [B, T, K]
    want = linear(x)
    got = q(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    # A row's output does not depend on its neighbours (per-row activation scales, exact int32 sums).
    loud = torch.cat([x[:1], 100 * torch.randn(4, 7, 64)])
    assert torch.equal(q(loud)[0], got[0])
    assert torch.equal(q(x[1:2, 3:4]), got[1:2, 3:4])


def test_quantize_then_reload_gives_the_same_logits() -> None:
    loaded = tiny_loaded_model()
    quantized = quantization.quantize(copy.deepcopy(loaded.model), loaded.tokenizer)
    assert isinstance(quantized.get_output_embeddings(), Int8Linear)
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    state = quantization.int8_state(quantized)
    reloaded = quantization.load_quantized(copy.deepcopy(loaded.model), state)
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, quantized(input_ids=ids).logits)
        assert torch.allclose(quantized(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=0.05)
    with pytest.raises(ValueError):
        quantization.load_quantized(copy.deepcopy(loaded.model), {k: v for k, v in list(state.items())[1:]})


def test_engine_runs_on_an_int8_head() -> None:
    loaded = tiny_loaded_model()
    quantization.quantize(loaded.model, loaded.tokenizer)
    core = EngineCore(loaded, EngineConfig(), PolicyConfig())
    assert core.vocab_size == loaded.model.config.vocab_size
    assert core.runner.scores_prompts  # prompt logprobs still read the (int8) head


def test_cuda_and_half_precision_are_refused() -> None:
    with pytest.raises(ValueError, match="quantization: int8 runs on CPU only"):
        quantization.check_supported("int8", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match="quantization: int8 needs --dtype float32"):
        quantization.check_supported("int8", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")


def test_cache_is_used_and_a_corrupt_one_rebuilt(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(model_module, "cache_root", lambda: tmp_path / "cache")
    model_dir = tmp_path / "float"
    model_dir.mkdir()
    save_file({"x": torch.zeros(1)}, str(model_dir / "model.safetensors"))  # keys the cache, never read
    calls = []
    real_quantize = quantization.quantize
    monkeypatch.setattr(quantization, "quantize", lambda m, t: calls.append(1) or real_quantize(m, t))

    def start():
        loaded = tiny_loaded_model()
        model_module.load_int8(loaded.model, loaded.tokenizer, model_dir, "tiny")
        with torch.inference_mode():
            return loaded.model(input_ids=torch.tensor([[2, 3, 4]])).logits

    first = start()
    assert len(calls) == 1
    cached = model_module.int8_cache_dir(model_dir, "tiny")
    assert model_module.cache_is_valid(cached)
    assert torch.equal(start(), first) and len(calls) == 1  # loaded, not re-quantized

    with open(cached / model_module.INT8_FILE, "r+b") as handle:  # flip bytes in the weights
        handle.seek(-64, 2)
        handle.write(b"\xff" * 64)
    assert torch.equal(start(), first) and len(calls) == 2  # rebuilt
    assert model_module.cache_is_valid(cached)
    assert torch.equal(start(), first) and len(calls) == 2


def test_linears_reading_one_input_share_its_quantization() -> None:
    """q/k/v and gate/up are smoothed together and quantize their input once; o/down alone."""
    loaded = tiny_loaded_model()
    quantized = quantization.quantize(copy.deepcopy(loaded.model), loaded.tokenizer)
    attn, mlp = quantized.model.layers[0].self_attn, quantized.model.layers[0].mlp
    assert attn.q_proj.shared is not None and attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared
    assert mlp.gate_proj.shared is not None and mlp.gate_proj.shared is mlp.up_proj.shared
    assert attn.o_proj.shared is None and mlp.down_proj.shared is None
    assert torch.equal(attn.q_proj.inv_smooth, attn.v_proj.inv_smooth)
    # Sharing changes no number: each member's output equals its own quantization of the input.
    x = torch.randn(3, 64)
    for member in (attn.q_proj, attn.k_proj, attn.v_proj):
        alone = Int8Linear(64, member.out_features, member.bias is not None)
        alone.load_state_dict(member.state_dict())
        assert torch.equal(member(x), alone(x))
    # Once every member has read it, the shared input is dropped (no activations kept after a layer).
    with torch.inference_mode():
        quantized(input_ids=torch.tensor([[3, 5, 7, 11]]))
    assert attn.q_proj.shared._last.x is None and mlp.up_proj.shared._last.quantized is None
    # A reload from the cache's state finds the same groups.
    reloaded = quantization.load_quantized(copy.deepcopy(loaded.model), quantization.int8_state(quantized))
    assert reloaded.model.layers[1].self_attn.k_proj.shared is reloaded.model.layers[1].self_attn.q_proj.shared
    assert reloaded.model.layers[1].self_attn.o_proj.shared is None
