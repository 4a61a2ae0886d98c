"""bench.quality's measures, on the tiny model (the real run is `python -m baton_sidecar.bench.quality`)."""

from __future__ import annotations

import math

from tiny import tiny_loaded_model

from baton_sidecar.bench.quality import agreement, greedy, perplexity


def test_agreement_counts_whole_sequences_and_prefixes() -> None:
    exact, prefix = agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [5, 9, 7, 8]])
    assert exact == 0.5 and prefix == (1.0 + 0.25) / 2


def test_perplexity_and_greedy_run_on_a_model() -> None:
    loaded = tiny_loaded_model()
    ppl = perplexity(loaded, ["w3 w4 w5 w6 w7", "w9 w8"], max_tokens=16)
    assert math.isfinite(ppl) and 1.0 < ppl < 10 * 96  # a random model: near the vocabulary size
    (tokens,) = greedy(loaded, [[3, 4, 5]], new_tokens=5)
    assert len(tokens) == 5
