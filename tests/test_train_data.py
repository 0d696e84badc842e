"""Training data at scale: the sample order's cost, local docpairs, the JSONL index, bad data."""

from __future__ import annotations

import numpy as np
import pytest

from sce_jax.train_data import SMALL_DATASET, EpochPermutation, SampleOrder, sample_order


def reference_order(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """The order of earlier versions: a fresh numpy permutation of all n per epoch."""
    positions = np.arange(start, start + count)
    permutations = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in set(positions // n)}
    return np.array([permutations[k // n][k % n] for k in positions])


@pytest.mark.parametrize("n, start, count", [(7, 0, 21), (7, 5, 10), (1000, 990, 32), (SMALL_DATASET, 3, 40)])
def test_small_datasets_keep_the_previous_order(n, start, count):
    np.testing.assert_array_equal(sample_order(n, 3, start, count), reference_order(n, 3, start, count))


@pytest.mark.parametrize("n", [SMALL_DATASET + 1, 3 * SMALL_DATASET + 7])
def test_large_permutation_is_a_bijection_per_epoch(n):
    for epoch in (0, 1):
        values = EpochPermutation(n, 5, epoch)(np.arange(n))
        assert values.min() == 0 and values.max() == n - 1 and len(np.unique(values)) == n
    order = SampleOrder(n, 5)
    whole = order(n - 10, 20)  # across an epoch boundary
    np.testing.assert_array_equal(whole[:10], EpochPermutation(n, 5, 0)(np.arange(n - 10, n)))
    np.testing.assert_array_equal(whole[10:], EpochPermutation(n, 5, 1)(np.arange(10)))
    np.testing.assert_array_equal(SampleOrder(n, 5)(n + 3, 7), whole[13:])  # resumable from the position alone
    assert not np.array_equal(SampleOrder(n, 6)(0, 20), SampleOrder(n, 5)(0, 20))
    # Not the identity, nor a shift: neighbouring positions land far apart.
    first = order(0, 1000)
    assert np.abs(np.diff(first)).mean() > n / 10


def test_per_step_work_does_not_depend_on_the_number_of_samples():
    """Counting the permutation elements computed for 200 steps of 32, at 2M and at 40M / 4e9 samples."""
    work = {}
    for n in (2 * SMALL_DATASET, 40_000_000, 4_000_000_000):
        order = SampleOrder(n, 42)
        for step in range(200):
            order(1000 + 32 * step, 32)
        work[n] = order.evaluations
    # Cycle walking costs < 4 evaluations per sample on average; nothing is proportional to n.
    assert all(200 * 32 <= w <= 4 * 200 * 32 for w in work.values()), work
    # The small-dataset path computes each epoch's permutation once, not once per step.
    order = SampleOrder(1000, 42)
    for step in range(200):  # 6.4 epochs
        order(32 * step, 32)
    assert order.evaluations == 7 * 1000
