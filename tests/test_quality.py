"""The statistical WARN checks' figures (kun_dagster.quality): each fails on crafted bad input and
passes on good input."""

import numpy as np

from kun_dagster import quality


def test_retention_within_bounds():
    assert quality.within("retention", 0.8, 0.5, 1.0, "retention").passed
    low = quality.within("retention", 0.1, 0.5, 1.0, "retention")
    assert not low.passed and low.detail == "retention 0.1 is outside [0.5, 1.0]"
    assert quality.within("retention", None, 0.5, 1.0, "retention").passed  # an empty partition has none


def test_rates():
    assert quality.rate("duplicate_rate", 1, 100, 0.3, "duplicates").passed
    high = quality.rate("empty_output_rate", 6, 20, 0.05, "empty")
    assert not high.passed and high.value == 0.3 and high.detail == "6 of 20 rows empty (0.3)"
    assert quality.rate("quarantine_rate", 0, 0, 0.1, "unreadable").passed


def test_score_distribution_against_earlier_partitions():
    rng = np.random.default_rng(0)
    earlier = rng.beta(8, 2, 500)  # mostly good scores
    assert quality.score_shift(rng.beta(8, 2, 200), earlier, 0.3).passed
    shifted = quality.score_shift(rng.beta(2, 8, 200), earlier, 0.3)  # mostly bad now
    assert not shifted.passed and shifted.value > 0.6
    assert quality.score_shift(np.array([0.9, np.nan]), np.array([]), 0.3).detail.startswith("no earlier scores")
    assert quality.ks_statistic(np.array([0.1, 0.2]), np.array([0.1, 0.2])) == 0.0
    assert quality.ks_statistic(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == 1.0


def test_faithfulness_flags_answers_that_share_little_with_their_source():
    text = "复利是指在计算利息时，把上一期的利息计入本金，一并计算下一期利息的方法。"
    faithful = "复利就是把上一期的利息计入本金，再一并计算下一期的利息。"
    invented = "月球是地球唯一的天然卫星，距离地球约三十八万公里。"
    assert quality.overlap(faithful, text) > 0.5 and quality.overlap(invented, text) < 0.1
    ok, low = quality.faithfulness([faithful, faithful], [text, text], 0.3, 0.2)
    assert ok.passed and low == []
    bad, low = quality.faithfulness([faithful, invented], [text, text], 0.3, 0.2)
    assert not bad.passed and low == [1] and bad.value == 0.5
