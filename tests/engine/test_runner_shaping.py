"""The batch KV cache keeps every row's logits equal to running that row alone.

Drives the runner by hand through inserts (shorter and longer than the batch), swap-removes,
swap-out/in and growth, comparing each row's logits against a full forward pass of that
row's tokens alone (no cache, no padding).
"""

from __future__ import annotations

import pytest
import torch

from baton_sidecar.engine.runner import ModelRunner
from tiny import random_prompts


def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


class Driver:
    """Keeps each row's token history beside the runner and checks logits after each step."""

    def __init__(self, loaded, padded_rows=None):
        self.model = loaded.model
        self.runner = ModelRunner(loaded, padded_rows)
        self.runner.cache.poison = float("nan")  # any read of a never-written slot would show
        self.tokens: dict[str, list[int]] = {}

    def admit(self, prompts: dict[str, list[int]]) -> None:
        ids = list(prompts)
        prefilled = self.runner.prefill(ids, [prompts[i] for i in ids])
        first = prefilled.last_logits.argmax(-1).tolist()
        for i, rid in enumerate(ids):
            torch.testing.assert_close(prefilled.last_logits[i], reference_logits(self.model, prompts[rid]),
                                       atol=1e-5, rtol=1e-4)
            self.tokens[rid] = prompts[rid] + [first[i]]
        self.runner.embed(prefilled, list(range(len(ids))), first)

    def step(self) -> None:
        logits = self.runner.decode()
        chosen = logits.argmax(-1).tolist()
        for row, rid in enumerate(self.runner.row_ids):
            # The row's pending token was just fed: logits must match the row alone.
            torch.testing.assert_close(logits[row], reference_logits(self.model, self.tokens[rid]),
                                       atol=1e-5, rtol=1e-4)
            self.tokens[rid].append(chosen[row])
        self.runner.set_next_tokens(chosen)
        self.check_layout()

    def check_layout(self) -> None:
        cache = self.runner.cache
        mask = cache.live_mask()
        assert mask.shape == (len(self.runner.row_ids), cache.length)
        for row, rid in enumerate(self.runner.row_ids):
            in_cache = len(self.tokens[rid]) - 1  # the last token is pending, not yet cached
            assert int(mask[row].sum()) == in_cache
            assert bool(mask[row, cache.length - in_cache:].all()), "tokens must be right-aligned"
            assert self.runner.positions[row] == in_cache
        assert self.runner.num_cached_tokens() == cache.num_real_tokens()
        if cache.rows:
            assert bool(mask[:, 0].any()), "leading all-padding columns must be trimmed"
        assert not cache.mask[cache.rows:].any(), "rows past B (dummy decode rows included) hold nothing"


@pytest.mark.parametrize("padded_rows", [None, {1: 5, 2: 4, 3: 4}], ids=["unpadded", "dummy-rows"])
def test_inserts_removals_and_swaps_keep_rows_exact(tiny_model, padded_rows):
    prompts = random_prompts(6, 3, 40, seed=1)
    drive = Driver(tiny_model, padded_rows)
    drive.admit({"a": prompts[0], "b": prompts[1]})
    for _ in range(3):
        drive.step()
    drive.admit({"long": list(range(2, 60))})  # longer than the batch: the window grows left
    drive.step()
    drive.admit({"short": prompts[2][:3], "mid": prompts[3]})  # shorter: right-aligned, left-masked
    drive.step()
    drive.runner.remove(["a"])  # swap-remove: the last row moves into a's slot
    drive.step()
    swapped = drive.runner.swap_out("long")  # leaves the batch; leading columns trimmed
    drive.step()
    drive.step()
    drive.runner.swap_in("long", swapped)
    drive.step()
    drive.runner.remove(["short", "b"])
    for _ in range(70):  # grows past the initial column capacity
        drive.step()
    assert drive.runner.cache.length >= 100


def test_memory_returns_to_baseline_when_batch_empties(tiny_model):
    drive = Driver(tiny_model)
    assert drive.runner.cache.allocated_bytes() == 0
    drive.admit({"x": [5, 6, 7], "y": [8, 9]})
    drive.step()
    assert drive.runner.cache.allocated_bytes() > 0
    drive.runner.remove(["x", "y"])
    assert drive.runner.cache.allocated_bytes() == 0
    assert drive.runner.num_rows == 0 and drive.runner.cache.length == 0


def test_remove_reports_compound_moves(tiny_model):
    drive = Driver(tiny_model)
    drive.admit({name: [3, 4, 5 + i] for i, name in enumerate("abcde")})
    drive.runner.remove(["a", "b"])  # e moves into b's slot, then d into a's
    assert sorted(drive.runner.row_ids) == ["c", "d", "e"]
    drive.step()


def test_shrink_returns_memory_after_long_rows_leave(tiny_model):
    drive = Driver(tiny_model)
    drive.admit({"long": list(range(2, 90)), "short": [4, 5]})
    drive.step()
    drive.runner.remove(["long"])
    before = drive.runner.cache.allocated_bytes()
    assert drive.runner.shrink_if_sparse(0.5)
    assert drive.runner.cache.allocated_bytes() < before
    drive.step()
    # Already at the minimum size: nothing to return, so no copy, however sparse.
    assert drive.runner.cache.num_slots() / (drive.runner.cache.row_capacity * drive.runner.cache.col_capacity) < 0.5
    assert not drive.runner.shrink_if_sparse(0.5)
