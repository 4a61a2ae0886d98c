"""The runner on fake systems (no model): repeats, capacity, loads, the plan's finish, floors."""

from __future__ import annotations

import pytest

from baton_sidecar.bench.metrics import RequestRecord
from baton_sidecar.bench.plans import compare
from baton_sidecar.bench.runner import CapacityRun, Plan, RunOptions, Runner
from baton_sidecar.bench.workloads import BenchRequest, Workload, all_at_once


class FakeSystem:
    """Finishes every request after ``delays.pop(0)`` seconds (no model); logs its name in ``order``."""

    def __init__(self, name, delays, order):
        self.name, self.delays, self.order = name, delays, order

    def run(self, workload, progress):
        from baton_sidecar.bench.systems import SystemRun

        self.order.append(self.name)
        delay = self.delays.pop(0)
        records = []
        for r in workload.requests:
            rec = RequestRecord(r.index, 0.0, r.prompt_len, r.max_tokens)
            rec.token_times_s = [delay] * r.max_tokens
            rec.finished_s, rec.output_tokens = delay, r.max_tokens
            records.append(rec)
        return SystemRun(self.name, records, cpu_s=1.0, wall_s=delay)


def test_repeat_rotates_the_order_and_keeps_the_median_run():
    runner = Runner(RunOptions(progress=False, repeat=3))
    order: list[str] = []
    fakes = {"a": FakeSystem("a", [1.0, 4.0, 2.0], order), "b": FakeSystem("b", [1.0, 1.0, 1.0], order)}
    workload = Workload("w", [BenchRequest(0, (1, 2), 4)])
    out = runner.run_rounds(fakes, workload)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert out["a"]["repeats"] == [4.0, 1.0, 2.0]
    assert out["a"]["output_tokens_per_s"] == 2.0  # the median run
    assert set(runner.runs) == {"a", "b"}


def _arrivals(n: int = 3) -> Workload:
    return Workload("w", [BenchRequest(i, (1, 2), 2, arrival_s=float(i)) for i in range(n)])


def test_execute_measures_capacity_then_runs_every_load():
    order: list[str] = []
    workload = _arrivals()
    systems = {"baton": FakeSystem("baton", [1.0, 1.0], order), "rtc": FakeSystem("rtc", [2.0, 2.0], order)}
    capacity = CapacityRun("capacity(rtc)", FakeSystem("cap", [1.5], order), all_at_once(workload), "measured")
    plan = Plan("trace", "trace", systems, workload, loads=(0.5, 1.0), capacity=capacity,
                finish=lambda result: result.update(ratios_vs_baton=compare.ratios(result["systems"])))
    runner = Runner(RunOptions(progress=False))
    result = runner.execute(plan)
    assert order == ["cap", "baton", "rtc", "baton", "rtc"]
    assert result["capacity"] == {"requests_per_s": 2.0, "source": "measured", "output_tokens_per_s": 4.0,
                                  "duration_s": 1.5}
    assert list(result["loads"]) == ["0.5", "1.0"]
    assert result["loads"]["1.0"]["offered_rate_req_per_s"] == pytest.approx(2.0)
    assert result["workload"]["load"] == 0.5 and result["workload"]["offered_rate_req_per_s"] == pytest.approx(1.0)
    assert result["systems"] is result["loads"]["0.5"]["systems"]
    assert set(runner.runs) == {"capacity(rtc)", "baton@0.5", "rtc@0.5", "baton@1.0", "rtc@1.0"}
    assert result["ratios_vs_baton"]["rtc"]["e2e_p95_s"] == pytest.approx(0.5)
    # The floors come from the table, for the plan's kind, after its finish.
    assert result["floors"] == [{"name": "trace: baton e2e p95 / rtc e2e p95", "measured": pytest.approx(0.5),
                                 "target": "<= 0.6", "met": True}]


def test_execute_one_load_given_capacity_and_another_load_key():
    order: list[str] = []
    plan = Plan("scenario: x", "x", {"fifo": FakeSystem("fifo", [1.0], order)}, _arrivals(), loads=(1.5,),
                capacity=4.0, load_key="overload", baseline="fifo")
    runner = Runner(RunOptions(progress=False))
    result = runner.execute(plan)
    assert result["capacity"] == {"requests_per_s": 4.0, "source": "--capacity"}
    assert result["workload"]["overload"] == 1.5 and "load" not in result["workload"]
    assert result["workload"]["offered_rate_req_per_s"] == pytest.approx(6.0)
    assert "loads" not in result and set(runner.runs) == {"fifo"}  # one load: no "@" suffix
    assert result["baseline"] == "fifo" and result["floors"] == []


def test_execute_without_loads_keeps_the_arrivals():
    order: list[str] = []
    workload = _arrivals()
    result = Runner(RunOptions(progress=False)).execute(
        Plan("offline", "offline", {"baton": FakeSystem("baton", [1.0], order)}, workload))
    assert "capacity" not in result and "loads" not in result
    assert result["workload"] == workload.summary()


def test_capacity_keys_are_the_plans():
    runner = Runner(RunOptions(progress=False))
    run = CapacityRun("capacity(fifo)", FakeSystem("c", [2.0], []), all_at_once(_arrivals()), "measured: fifo",
                      keys=("requests_per_s", "output_tokens_per_s", "source"))
    assert runner.measure_capacity(run) == {"requests_per_s": 1.5, "output_tokens_per_s": 3.0,
                                            "source": "measured: fifo"}
