"""Which decode batch sizes get dummy rows, from measured matmul times."""

from __future__ import annotations

import torch

from baton_sidecar.engine import row_padding


def test_pads_only_to_a_clearly_faster_row_count():
    # The shape seen on a 2-core x86 CPU: one GEMV per row below 4 rows, GEMM from 4 on.
    times = {1: 11.0, 2: 24.0, 3: 36.0, 4: 18.0, 5: 20.0, 6: 20.5, 7: 20.6, 8: 20.6}
    assert row_padding.padded_rows_table(times) == {2: 4, 3: 4}


def test_no_padding_when_time_grows_with_rows():
    assert row_padding.padded_rows_table({r: 10.0 + r for r in range(1, 9)}) == {}
    # A saving under 20% is not worth the dummy rows' attention and memory.
    assert row_padding.padded_rows_table({1: 10.0, 2: 10.0, 3: 9.0}) == {}


def test_calibration_measures_the_output_projection_on_cpu_only(tiny_model):
    table = row_padding.calibrate(tiny_model.model, torch.device("cpu"))
    assert all(1 <= rows < padded <= row_padding.MAX_PADDED_ROWS for rows, padded in table.items())
    assert row_padding.calibrate(tiny_model.model, torch.device("cuda")) == {}
