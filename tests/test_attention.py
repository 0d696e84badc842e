"""Pieces of the XLA band attention against hand-built values and a dense numpy attention."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sce_jax import attention


@pytest.mark.parametrize("rows,window", [(4, 1), (5, 2), (32, 4)])
def test_skew_picks_each_rows_band_and_unskew_inverts_it(rows, window):
    span = rows + 2 * window
    # Entry (b, s) encodes its own coordinates, so the band can be checked by value.
    block = np.arange(rows)[:, None] * 1000 + np.arange(span)[None, :]
    band = np.asarray(attention._skew(jnp.asarray(block, jnp.float32), window))
    expected = np.array([[b * 1000 + b + o for o in range(2 * window + 1)] for b in range(rows)])
    np.testing.assert_array_equal(band, expected)

    back = np.asarray(attention._unskew(jnp.asarray(band), span))
    on_band = (np.arange(span)[None, :] - np.arange(rows)[:, None] >= 0) & (
        np.arange(span)[None, :] - np.arange(rows)[:, None] <= 2 * window
    )
    np.testing.assert_array_equal(back, np.where(on_band, block, 0))


def test_single_row_attention_matches_numpy():
    rng = np.random.default_rng(0)
    docs, heads, head_dim = 3, 4, 8
    q = rng.standard_normal((docs, heads, head_dim)).astype(np.float32)
    segments = []
    for length in (1, 5, 7):
        k, v = (rng.standard_normal((docs, length, heads, head_dim)).astype(np.float32) for _ in range(2))
        mask = rng.random((docs, length)) < 0.7
        segments.append((k, v, mask))
    segments[0][2][:] = True  # every row sees at least one key

    out = np.asarray(attention.single_row_attention(jnp.asarray(q), [tuple(map(jnp.asarray, s)) for s in segments]))

    k = np.concatenate([s[0] for s in segments], axis=1).astype(np.float64)
    v = np.concatenate([s[1] for s in segments], axis=1).astype(np.float64)
    mask = np.concatenate([s[2] for s in segments], axis=1)
    scores = np.einsum("dhk,dshk->dhs", q, k) / math.sqrt(head_dim)
    scores = np.where(mask[:, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("dhs,dshk->dhk", probs, v), atol=1e-5, rtol=1e-5)
