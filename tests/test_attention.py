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


@pytest.mark.parametrize("slots", [1, 3])
def test_cls_attention_matches_numpy(slots):
    """[CLS] c sees itself, the row's visible query keys and exactly the tokens of document slot c."""
    rng = np.random.default_rng(0)
    rows, heads, head_dim, query_length, length = 3, 4, 8, 5, 11
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    q_cls, k_cls, v_cls = (normal(rows, slots, heads, head_dim) for _ in range(3))
    kq, vq = (normal(rows, query_length, heads, head_dim) for _ in range(2))
    k_doc, v_doc = (normal(rows, length, heads, head_dim) for _ in range(2))
    query_mask = rng.random((rows, query_length)) < 0.7
    doc_slot = np.sort(rng.integers(-1, slots, (rows, length)), axis=1)[:, ::-1].copy()  # -1 (padding) last

    out = np.asarray(attention.cls_attention(*map(jnp.asarray, (q_cls, k_cls, v_cls, kq, vq, query_mask, k_doc, v_doc, doc_slot))))

    expected = np.zeros(out.shape)
    for d in range(rows):
        for c in range(slots):
            keys = np.concatenate([k_cls[d, c, None], kq[d][query_mask[d]], k_doc[d][doc_slot[d] == c]])
            values = np.concatenate([v_cls[d, c, None], vq[d][query_mask[d]], v_doc[d][doc_slot[d] == c]])
            scores = np.einsum("hk,shk->hs", q_cls[d, c].astype(np.float64), keys) / math.sqrt(head_dim)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            expected[d, c] = np.einsum("hs,shk->hk", probs, values)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
