"""The fused-vs-separate chunk cost bench, on the tiny model."""

from __future__ import annotations

from baton_sidecar.bench.fusion import measure, table


def test_each_chunk_is_timed_both_ways_after_the_same_prefix(tiny_model):
    results = measure(tiny_model, rows=2, start=8, chunks=[0, 4, 6], context=5, repeat=1)
    assert [(r["rows"], r["start"], r["chunk"]) for r in results] == [(2, 8, 0), (2, 8, 4), (2, 8, 6)]
    assert all(r["fused_s"] > 0 and r["separate_s"] > 0 for r in results)
    lines = table(results).splitlines()
    assert len(lines) == 2 + 2 and lines[2].startswith("| 2 | 8 | 4 |")  # chunk 0 is the reference row
