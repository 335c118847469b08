"""Bootstrap intervals: coverage on a known distribution, the stratified average, pairing, speed."""
from __future__ import annotations

import time

import numpy as np
import pytest

from sparsedecode.evals.stats import bootstrap_ci, paired_difference_ci


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2024)
    covered = 0
    for repetition in range(200):
        sample = rng.random(400) < 0.7  # Bernoulli(0.7)
        interval = bootstrap_ci(sample, seed=repetition)
        assert interval.low <= interval.mean <= interval.high and interval.count == 400
        covered += interval.low <= 0.7 <= interval.high
    # 95% nominal; with 200 trials, 183..197 holds a true rate of 0.95 with probability > 0.99
    assert 183 <= covered <= 197, covered


def test_continuous_values_and_width():
    values = np.random.default_rng(0).normal(10.0, 2.0, 1000)  # many distinct values: resampled by index
    interval = bootstrap_ci(values)
    assert interval.mean == pytest.approx(values.mean())
    # about +-1.96 standard errors
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * values.std() / np.sqrt(1000), rel=0.1)


def test_same_seed_same_interval_and_10000_resamples_are_fast():
    values = (np.random.default_rng(1).random(1100) < 0.8).astype(float)
    groups = [(f"task{i % 11}", 4096 << (i // 11 % 4)) for i in range(1100)]  # 44 cells of 25
    start = time.perf_counter()
    first = bootstrap_ci(values, groups, resamples=10_000, seed=3)
    assert time.perf_counter() - start < 2.0
    assert bootstrap_ci(values, groups, resamples=10_000, seed=3) == first
    assert bootstrap_ci(values, groups, resamples=10_000, seed=4) != first


def test_stratified_mean_is_the_mean_of_the_cell_means():
    values = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    groups = ["a", "a", "a", "a", "b", "b"]
    interval = bootstrap_ci(values, groups)
    assert interval.mean == pytest.approx((1.0 + 0.5) / 2)  # not the pooled 5/6
    # cell a is constant: only cell b varies, so the average stays within [0.5, 1.0]
    assert 0.5 <= interval.low <= interval.high <= 1.0
    constant = bootstrap_ci([0.25] * 7 + [0.75] * 3, ["x"] * 7 + ["y"] * 3)
    assert (constant.low, constant.mean, constant.high) == (0.5, 0.5, 0.5)


def test_paired_interval_of_identical_scores_is_zero():
    a = np.random.default_rng(5).random(300) < 0.6
    interval = paired_difference_ci(a, a, [i % 6 for i in range(300)])
    assert (interval.low, interval.mean, interval.high) == (0.0, 0.0, 0.0)


def test_paired_interval_detects_a_shift_the_unpaired_ones_miss():
    rng = np.random.default_rng(7)
    difficulty = rng.random(500)
    dense = (difficulty < 0.7).astype(float)
    sparse = dense.copy()
    sparse[rng.choice(np.flatnonzero(dense), 25, replace=False)] = 0.0  # loses 5 points on the same prompts
    a, b = bootstrap_ci(sparse), bootstrap_ci(dense)
    assert a.high > b.low  # the two marginal intervals overlap...
    shift = paired_difference_ci(sparse, dense)
    assert shift.mean == pytest.approx(-0.05)
    assert shift.high < 0  # ...but the paired difference excludes 0
    assert shift.low <= -0.05 <= shift.high


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="group labels"):
        bootstrap_ci([1.0, 0.0], ["a"])
    with pytest.raises(ValueError, match="same shape"):
        paired_difference_ci([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.0)
