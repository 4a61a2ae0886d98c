"""Paired statistics: the sign test, the word edit distance, the verdict, and why pairs need fewer requests."""

from __future__ import annotations

import math
import random

import pytest

from baton_sidecar import stats
from baton_sidecar.server.abstats import verdict as unpaired_verdict
from baton_sidecar.server.paired import (BETTER, INSUFFICIENT, NOT_WORSE, WORSE, ArmTiming, Pair, paired_block,
                                         sign_test, summarize_differences, word_edit_distance)


def test_sign_test_is_the_exact_binomial():
    # 9 of 10 pairs below zero: P = 2 * (C(10,9) + C(10,10)) / 2^10
    assert sign_test([-1.0] * 9 + [1.0]) == pytest.approx(2 * 11 / 1024)
    assert sign_test([-1.0, 1.0]) == 1.0
    assert sign_test([0.0, 0.0]) is None  # only ties: nothing to test
    assert sign_test([-1.0] * 5 + [0.0] * 3) == pytest.approx(2 / 32)  # ties dropped


def test_word_edit_distance():
    assert word_edit_distance("a b c", "a b c") == 0
    assert word_edit_distance("a b c", "a x c") == pytest.approx(1 / 3)
    assert word_edit_distance("a b c d", "a b") == pytest.approx(2 / 4)
    assert word_edit_distance("", "x y") == 1


def pair(baton_e2e: float, incumbent_e2e: float, text=("same", "same")) -> Pair:
    return Pair(ArmTiming(baton_e2e / 4, baton_e2e, 5, text[0]), ArmTiming(incumbent_e2e / 4, incumbent_e2e, 5, text[1]),
                greedy=True, incumbent_in_flight=2, baton_in_flight=1, edit_distance=0.0 if text[0] == text[1] else 0.5)


@pytest.mark.parametrize("shift, want", [(-0.2, BETTER), (0.03, NOT_WORSE), (0.5, WORSE)])
def test_the_verdict_follows_the_median_difference_and_the_margin(shift, want):
    rng = random.Random(1)
    pairs = []
    for _ in range(200):
        base = rng.uniform(0.5, 3.0)  # incumbent median about 1.75 s: the 10% margin is ~175 ms
        pairs.append(pair(base + shift + rng.gauss(0, 0.02), base))
    block = paired_block(pairs)
    assert block["verdict"] == want, block["basis"]
    e2e = block["metrics"]["e2e"]
    assert e2e["n"] == 200 and e2e["median_ci95"][0] <= e2e["median_diff_s"] <= e2e["median_ci95"][1]
    assert (e2e["baton_faster_share"] > 0.9) == (shift < 0)
    assert block["agreement"] == {"greedy_pairs": 200, "identical_share": 1.0, "mean_edit_distance": 0.0}
    assert block["contention"] == {"mean_incumbent_in_flight": 2.0, "mean_baton_in_flight": 1.0}


def test_few_pairs_or_a_straddling_ci_give_no_verdict():
    assert paired_block([pair(1.0, 1.5)] * 5)["verdict"] == INSUFFICIENT
    assert paired_block([])["verdict"] == INSUFFICIENT and paired_block([])["metrics"]["e2e"]["n"] == 0
    rng = random.Random(2)
    noisy = [pair(1.0 + rng.gauss(0.1, 0.5), 1.0) for _ in range(30)]  # CI wider than the margin
    assert paired_block(noisy)["verdict"] == INSUFFICIENT


def requests_to_verdict(decide, max_requests: int = 4000) -> int:
    """The smallest request count (doubling from 20) at which ``decide(n)`` says Baton is better."""
    n = 20
    while n <= max_requests:
        if decide(n) == BETTER:
            return n
        n *= 2
    return math.inf


def test_the_paired_verdict_needs_fewer_than_half_the_requests_of_the_unpaired_one():
    """Request latencies vary tenfold with their lengths; Baton takes 15% less on each request.

    Unpaired (the A/B split): each arm gets half the requests, and their p95s are compared with
    independent CIs. Paired (shadow): every request runs on both arms, and the per-request
    differences remove the between-request spread.
    """
    rng = random.Random(7)
    base = [math.exp(rng.gauss(0, 0.8)) for _ in range(4000)]  # lognormal: p95/p5 about 14
    baton = [b * 0.85 * math.exp(rng.gauss(0, 0.05)) for b in base]
    incumbent = [b * math.exp(rng.gauss(0, 0.05)) for b in base]

    def paired(n: int) -> str:
        return paired_block([pair(baton[i], incumbent[i]) for i in range(n)])["verdict"]

    def unpaired(n: int) -> str:  # requests alternate between the arms
        b, i = stats.estimate(baton[0:n:2]), stats.estimate(incumbent[1:n:2])
        return unpaired_verdict(b, i)["result"]

    paired_n, unpaired_n = requests_to_verdict(paired), requests_to_verdict(unpaired)
    assert paired_n * 2 < unpaired_n, (paired_n, unpaired_n)


def test_summary_of_no_differences_is_empty():
    assert summarize_differences([])["median_diff_s"] is None
