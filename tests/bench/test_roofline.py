"""The roofline's cost model on the tiny Llama (hand-counted), its step summary and its report section.

No timing is asserted: the peaks are given, except one check that measuring them returns numbers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from baton_sidecar.bench import report, roofline

# tests/tiny.py: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads (head_dim 16), vocab 96.
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 128, 2, 4, 2, 16, 96
PER_LAYER = (HIDDEN * HIDDEN * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2  # q, o; k, v
             + 3 * HIDDEN * INTER)  # gate, up, down
MATMUL = LAYERS * PER_LAYER + VOCAB * HIDDEN  # the head included
NORMS = LAYERS * 2 * HIDDEN + HIDDEN


def test_cost_model_of_the_untied_tiny_model(tiny_model):
    cost = roofline.cost_model(tiny_model.model)
    assert cost.matmul_params == MATMUL == 79872
    # every parameter once, but the input embedding: a step gathers only its rows' entries
    assert cost.weight_bytes == 4 * (MATMUL + NORMS) == 320768
    assert cost.weight_bytes_by_dtype == {"float32": cost.weight_bytes} and cost.compute_dtype == "float32"
    assert (cost.layers, cost.heads, cost.kv_heads, cost.head_dim, cost.kv_element_size) == (2, 4, 2, 16, 4)
    assert cost.decode_flops(rows=3, context=10) == 3 * (2 * MATMUL + 4 * LAYERS * HEADS * HEAD_DIM * 10)
    assert cost.kv_read_bytes(rows=3, context=10) == 2 * LAYERS * KV_HEADS * HEAD_DIM * 10 * 3 * 4
    assert cost.decode_bytes(3, 10) == cost.weight_bytes + cost.kv_read_bytes(3, 10)
    assert cost.prefill_flops(7) == 2 * MATMUL * 7


def test_tied_embeddings_count_once_and_bfloat16_counts_two_bytes():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cost = roofline.cost_model(model)
    assert cost.weight_bytes == 4 * (MATMUL + NORMS)  # the shared table once, as the head
    half = roofline.cost_model(model.to(torch.bfloat16))
    assert half.weight_bytes == 2 * (MATMUL + NORMS) and half.kv_element_size == 2
    assert half.compute_dtype == "bfloat16" and half.matmul_params == MATMUL


def test_dynamic_int8_linears_count_one_byte_per_weight(tiny_model):
    quantize = pytest.importorskip("torch.ao.quantization").quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        model = quantize(tiny_model.model, {torch.nn.Linear}, dtype=torch.qint8)
    cost = roofline.cost_model(model)
    assert cost.matmul_params == MATMUL
    assert cost.weight_bytes_by_dtype["int8"] == MATMUL
    assert cost.weight_bytes_by_dtype["float32"] == 4 * NORMS  # the norms (no linear has a bias)
    assert cost.compute_dtype == "int8"


def test_buckets_are_powers_of_two():
    assert [roofline.bucket(n)[1] for n in (1, 2, 3, 4, 5, 8, 9, 33)] == \
        ["1", "2", "3-4", "3-4", "5-8", "5-8", "9-16", "33-64"]


COST = roofline.CostModel(weight_bytes=1_000_000_000, matmul_params=100_000_000, layers=2, heads=4, kv_heads=2,
                          head_dim=16, kv_element_size=4, weight_bytes_by_dtype={"float32": 1_000_000_000})
PEAKS = {"copy_gb_per_s": 20.0, "matmul_gflop_per_s": {"float32": 100.0, "int8": 400.0}, "matmul_n": 1024,
         "device": "cpu", "threads": 1, "measure_s": 0.5}


def _step(rows: int, length: int, decode_s: float, prefill_tokens: int = 0, prefill_s: float = 0.0) -> dict:
    return {"t": 0.0, "step_s": decode_s + prefill_s, "prefill_s": prefill_s, "prefill_tokens": prefill_tokens,
            "chunk_s": 0.0, "chunk_tokens": 0, "decode_s": decode_s, "rows": rows, "length": length,
            "padding_ratio": 0.0}


def test_summary_by_batch_bucket():
    steps = [_step(1, 100, 0.1), _step(1, 100, 0.1), _step(3, 50, 0.2), _step(4, 50, 0.2),
             _step(0, 0, 0.0, prefill_tokens=100, prefill_s=1.0)]
    summary = roofline.summarize(steps, COST, PEAKS)
    one, four = summary["decode_by_batch"]["1"], summary["decode_by_batch"]["3-4"]
    assert list(summary["decode_by_batch"]) == ["1", "3-4"]
    assert one["steps"] == 2 and four["steps"] == 2 and four["mean_rows"] == 3.5
    assert one["weight_gb_per_s"] == pytest.approx(10.0)  # 1 GB per step in 0.1 s
    nbytes = 1e9 + COST.kv_read_bytes(1, 100)
    assert one["gb_per_s"] == pytest.approx(nbytes / 0.1 / 1e9)
    assert one["bandwidth_fraction"] == pytest.approx(nbytes / 0.1 / 1e9 / 20.0)
    flops = 2 * 1e8 + 4 * 2 * 4 * 16 * 100
    assert one["gflop_per_s"] == pytest.approx(flops / 0.1 / 1e9)
    assert one["bound"] == "memory" and one["roofline_fraction"] == pytest.approx(nbytes / 1e9 / 20 / 0.1)
    assert summary["prefill"]["tokens"] == 100
    assert summary["prefill"]["gflop_per_s"] == pytest.approx(2e8 * 100 / 1e9)
    assert summary["prefill"]["bound"] == "compute"


def test_report_section_renders_from_fake_steps():
    steps = [_step(1, 100, 0.1), _step(16, 120, 0.3), _step(0, 0, 0.0, 40, 0.5)]
    ceiling = {"1": {"step_s": 0.09, "tokens_per_s": 11.1, "context_len": 100, "samples": 5}}
    result = {"ceiling": ceiling, "roofline": {
        "peaks": PEAKS, "cost_model": COST.as_dict(),
        "systems": {"baton": roofline.summarize(steps, COST, PEAKS)},
        "ceiling": roofline.ceiling_roofline(ceiling, COST, PEAKS)}}
    text = "\n".join(report.roofline_section(result))
    assert text.startswith("## Roofline")
    assert "copy 20.0 GB/s" in text and "float32 100.0, int8 400.0" in text and "1000.0 MB of weights" in text
    assert "| baton | 1 | 1 | 100 | 100.0 | 10.0 |" in text and "| baton | 9-16 | 1 | 120 |" in text
    assert "| bare forward | 1 | - | 100 | 90.0 |" in text
    assert "Prefill of baton: 40 tokens" in text
    assert report.roofline_section({}) == []


def test_measured_peaks_are_positive_numbers():
    peaks = roofline.measure_peaks(torch.device("cpu"), torch.float32)
    assert peaks["copy_gb_per_s"] > 0 and peaks["matmul_gflop_per_s"]["float32"] > 0
    assert set(peaks["matmul_gflop_per_s"]) == {"float32", "int8"}


def test_batons_int8_linears_count_their_int8_weights_and_scales(tiny_model):
    """``quantization.Int8Linear`` keeps its weights in buffers: one byte each, plus float32 scales."""
    import copy

    from baton_sidecar import quantization

    model = quantization.quantize(copy.deepcopy(tiny_model.model), tiny_model.tokenizer)
    cost = roofline.cost_model(model)
    linears = [m for m in model.modules() if isinstance(m, quantization.Int8Linear)]
    scales = sum(4 * (m.out_features + m.in_features) for m in linears)  # scale [N] + inv_smooth [K]
    assert cost.weight_bytes_by_dtype["int8"] == MATMUL
    assert cost.weight_bytes == MATMUL + scales + 4 * NORMS and cost.compute_dtype == "int8"
