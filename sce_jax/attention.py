"""Attention of one layer over the three token groups: [CLS] (one per document), query, document.

Tensors use the layout [batch, tokens, heads, head_dim] (`..._DxLxHxK`), the layout the projections produce,
so no transposes are needed. Scores and softmax are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sce_jax.config import SparseCrossEncoderConfig

ATTENTION_IMPLS = ("auto", "xla", "dense", "pallas")

# Mask value for scores: finite so fully masked rows stay NaN-free (they are zeroed explicitly).
_NEG = -1e30


class Groups(NamedTuple):
    """Per-group tensors: `cls` [D, ...], `query` [Q, Lq, ...] (Q = D when not shared), `doc` [D, Ld, ...]."""

    cls: jax.Array
    query: jax.Array
    doc: jax.Array


def resolve_attention_impl(impl: str) -> str:
    """Turn "auto" into a concrete implementation for the default backend."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to `mask`; rows without a visible key give all zeros."""
    scores = jnp.where(mask, scores, _NEG)
    weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True)) * mask
    return weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def _scores(q_DxTxHxK: jax.Array, k_DxSxHxK: jax.Array) -> jax.Array:
    scale = 1.0 / math.sqrt(q_DxTxHxK.shape[-1])
    return jnp.einsum("dthk,dshk->dhts", q_DxTxHxK, k_DxSxHxK, preferred_element_type=jnp.float32) * scale


def segment_attention(q_DxTxHxK, segments) -> jax.Array:
    """Rows attend to the union of several key segments with one joint softmax.

    `segments` is a sequence of (k [D,S,H,K], v [D,S,H,K], mask [D,S]); scores are concatenated rather than keys,
    which copies only the (small) score rows of [CLS] and query tokens.
    """
    scores = jnp.concatenate([_scores(q_DxTxHxK, k) for k, _, _ in segments], axis=-1)
    mask = jnp.concatenate([m for _, _, m in segments], axis=-1)[:, None, None, :]
    probs_DxHxTxS = _masked_softmax(scores, mask)
    out = 0
    start = 0
    for _, v, m in segments:
        p = probs_DxHxTxS[..., start : start + m.shape[-1]].astype(v.dtype)
        out = out + jnp.einsum("dhts,dshk->dthk", p, v, preferred_element_type=jnp.float32)
        start += m.shape[-1]
    return out.astype(q_DxTxHxK.dtype)


def doc_attention(
    q_DxLxHxK: jax.Array,
    k_DxLxHxK: jax.Array,
    v_DxLxHxK: jax.Array,
    kg_DxGxHxK: jax.Array,
    vg_DxGxHxK: jax.Array,
    doc_mask_DxL: jax.Array,
    global_mask_DxG: jax.Array,
    *,
    window: int | None,
    impl: str = "xla",
    interpret: bool = False,
) -> jax.Array:
    """Document rows: ±window document keys plus global ([CLS], query) keys, one softmax.

    impl "dense" builds the full [L, L] band mask (the readable reference), "xla" computes only the band
    (`_blocked_doc_attention`, memory O(L·(block + 2·window))), "pallas" runs the fused GPU kernel.
    """
    impl = resolve_attention_impl(impl)
    length = q_DxLxHxK.shape[1]
    if impl == "pallas":
        from kernels import windowed_attention

        return windowed_attention(
            q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK, doc_mask_DxL, global_mask_DxG,
            window=window, interpret=interpret,
        )
    if impl == "dense" or window is None or window >= length - 1:
        return _dense_doc_attention(
            q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK, doc_mask_DxL, global_mask_DxG, window
        )
    return _blocked_doc_attention(
        q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK, doc_mask_DxL, global_mask_DxG, window
    )


def _dense_doc_attention(q, k, v, kg, vg, doc_mask_DxL, global_mask_DxG, window):
    length = q.shape[1]
    pos = jnp.arange(length)
    band_LxL = jnp.ones((length, length), bool) if window is None else abs(pos[:, None] - pos[None, :]) <= window
    local_mask = band_LxL[None, None] & doc_mask_DxL[:, None, None, :]
    global_mask = jnp.broadcast_to(global_mask_DxG[:, None, None, :], (*local_mask.shape[:3], kg.shape[1]))
    scores = jnp.concatenate([_scores(q, kg), _scores(q, k)], axis=-1)
    probs = _masked_softmax(scores, jnp.concatenate([global_mask, local_mask], axis=-1))
    num_global = kg.shape[1]
    out = jnp.einsum("dhts,dshk->dthk", probs[..., :num_global].astype(vg.dtype), vg, preferred_element_type=jnp.float32)
    out += jnp.einsum("dhts,dshk->dthk", probs[..., num_global:].astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _block_size(window: int) -> int:
    # Blocks of at least 32 rows keep the per-block score matmuls efficient; wider windows get wider blocks so
    # the 2·window halo does not dominate.
    return max(32, 2 * window)


# Up to this many band offsets, values are gathered as shifted slices (cheap elementwise passes on CPU);
# wider bands go back to a block matmul.
_MAX_SHIFTED_OFFSETS = 17


def _skew(x, window):
    """Block scores [..., B, B + 2w] -> band [..., B, 2w + 1] (row b's keys b .. b + 2w), by a reshape.

    Row b's band starts at flat index b·(S + 1) of the row-major [B, S] block, so viewing the block (padded by B
    elements) as [B, S + 1] lines the bands up in the first 2w + 1 columns.
    """
    *lead, rows, span = x.shape
    flat = jnp.pad(x.reshape(*lead, rows * span), [(0, 0)] * len(lead) + [(0, rows)])
    return flat.reshape(*lead, rows, span + 1)[..., : 2 * window + 1]


def _unskew(band, span):
    """The inverse of `_skew`: band [..., B, 2w + 1] -> block [..., B, span] with zeros off the band."""
    *lead, rows, width = band.shape
    padded = jnp.pad(band, [(0, 0)] * len(lead) + [(0, 0), (0, span + 1 - width)])
    return padded.reshape(*lead, rows * (span + 1))[..., : rows * span].reshape(*lead, rows, span)


def _blocked_doc_attention(q, k, v, kg, vg, doc_mask_DxL, global_mask_DxG, window):
    """Band attention with scores from block matmuls and a softmax over just the 2w + 1 band offsets.

    Row block n (B rows) scores its keys [n·B - w, n·B + B + w) in one matmul; `_skew` keeps each row's 2w + 1
    band entries, so masks and softmax see [D, L, H, 2w + 1 + G] in the projection's layout. Values are summed
    as 2w + 1 shifted slices (narrow bands) or by a block matmul of the un-skewed probabilities (wide ones).
    """
    num_docs, length, heads, head_dim = q.shape
    block = min(_block_size(window), length)
    num_blocks = -(-length // block)
    padded = num_blocks * block
    span = block + 2 * window
    offsets = 2 * window + 1

    def pad_tokens(x, before, after):
        return jnp.pad(x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))

    q_DxNxBxHxK = pad_tokens(q, 0, padded - length).reshape(num_docs, num_blocks, block, heads, head_dim)
    # Key block n covers padded positions [n·block, n·block + span) of the halo-padded keys.
    key_index_NxS = jnp.arange(num_blocks)[:, None] * block + jnp.arange(span)[None, :]
    halo = (window, padded - length + window)
    k_DxNxSxHxK = pad_tokens(k, *halo)[:, key_index_NxS]
    scale = 1.0 / math.sqrt(head_dim)
    block_scores = jnp.einsum("dnbhk,dnshk->dnhbs", q_DxNxBxHxK, k_DxNxSxHxK, preferred_element_type=jnp.float32)
    band_DxLxHxO = jnp.moveaxis(_skew(block_scores, window), 2, 3).reshape(num_docs, padded, heads, offsets)
    band_DxLxHxO = band_DxLxHxO[:, :length] * scale
    # Offset o of row r is key r - window + o.
    key_mask = pad_tokens(doc_mask_DxL, window, window)
    band_mask_DxLx1xO = jnp.stack([key_mask[:, o : o + length] for o in range(offsets)], axis=-1)[:, :, None]

    global_DxLxHxG = jnp.einsum("dlhk,dghk->dlhg", q, kg, preferred_element_type=jnp.float32) * scale
    num_global = kg.shape[1]
    global_mask = jnp.broadcast_to(global_mask_DxG[:, None, None, :], global_DxLxHxG.shape)
    probs = _masked_softmax(
        jnp.concatenate([global_DxLxHxG, band_DxLxHxO], axis=-1),
        jnp.concatenate([global_mask, jnp.broadcast_to(band_mask_DxLx1xO, band_DxLxHxO.shape)], axis=-1),
    )
    out = jnp.einsum(
        "dlhg,dghk->dlhk", probs[..., :num_global].astype(vg.dtype), vg, preferred_element_type=jnp.float32
    )
    band_probs = probs[..., num_global:].astype(v.dtype)
    if offsets <= _MAX_SHIFTED_OFFSETS:
        # Products in float32, as the matmuls accumulate them.
        band_probs = band_probs.astype(jnp.float32)
        v_halo = pad_tokens(v, window, window).astype(jnp.float32)
        for o in range(offsets):
            out += band_probs[..., o, None] * v_halo[:, o : o + length]
        return out.astype(q.dtype)
    block_probs = _unskew(
        jnp.moveaxis(pad_tokens(band_probs, 0, padded - length).reshape(num_docs, num_blocks, block, heads, offsets), 2, 3),
        span,
    )
    v_DxNxSxHxK = pad_tokens(v, *halo)[:, key_index_NxS]
    out += jnp.einsum(
        "dnhbs,dnshk->dnbhk", block_probs, v_DxNxSxHxK, preferred_element_type=jnp.float32
    ).reshape(num_docs, padded, heads, head_dim)[:, :length]
    return out.astype(q.dtype)


def single_row_attention(q_DxHxK: jax.Array, segments) -> jax.Array:
    """One query row per document ([CLS]) against key segments, with one joint softmax.

    Keys and values stay in the projection's layout [D, S, H·K]: scores come from a matmul with a block-diagonal
    [H·K, H] matrix built from the row, and outputs from [H, S] x [S, H·K] keeping the diagonal blocks, so no
    [D, S, H, K] tensor is transposed (XLA CPU otherwise transposes every document's keys and values).
    """
    num_docs, heads, head_dim = q_DxHxK.shape
    features = heads * head_dim
    eye_HxH = jnp.eye(heads, dtype=q_DxHxK.dtype)
    q_DxFxH = (q_DxHxK[:, :, :, None] * eye_HxH[None, :, None, :]).reshape(num_docs, features, heads)
    scale = 1.0 / math.sqrt(head_dim)
    scores_DxSxH = jnp.concatenate(
        [
            jnp.einsum("dsf,dfh->dsh", k.reshape(num_docs, -1, features), q_DxFxH, preferred_element_type=jnp.float32)
            for k, _, _ in segments
        ],
        axis=1,
    ) * scale
    mask_DxS = jnp.concatenate([m for _, _, m in segments], axis=1)
    probs_DxHxS = _masked_softmax(jnp.swapaxes(scores_DxSxH, 1, 2), mask_DxS[:, None, :])
    out_DxHxF = 0
    start = 0
    for _, v, m in segments:
        p = probs_DxHxS[..., start : start + m.shape[-1]].astype(v.dtype)
        out_DxHxF += jnp.einsum(
            "dhs,dsf->dhf", p, v.reshape(num_docs, -1, features), preferred_element_type=jnp.float32
        )
        start += m.shape[-1]
    out_DxHxHxK = out_DxHxF.reshape(num_docs, heads, heads, head_dim)
    return jnp.einsum("dhgk,hg->dhk", out_DxHxHxK, eye_HxH.astype(out_DxHxF.dtype)).astype(q_DxHxK.dtype)


def sparse_attention(
    q: Groups,
    k: Groups,
    v: Groups,
    query_mask_QxLq: jax.Array,
    doc_mask_DxLd: jax.Array,
    doc_query_D: jax.Array,
    config: SparseCrossEncoderConfig,
    *,
    impl: str = "xla",
    interpret: bool = False,
) -> Groups:
    """One layer's attention for all three groups, following the config's pattern.

    `q.query` etc. have Q rows; `doc_query_D` maps documents to them (the identity when the query is encoded
    per document).
    """
    num_docs = doc_mask_DxLd.shape[0]
    ones_Dx1 = jnp.ones((num_docs, 1), bool)
    false_Dx1 = jnp.zeros((num_docs, 1), bool)
    # Query keys as seen from each document (a gather of Lq rows per document).
    kq_D, vq_D, qmask_D = k.query[doc_query_D], v.query[doc_query_D], query_mask_QxLq[doc_query_D]
    k_cls, v_cls = k.cls[:, None], v.cls[:, None]

    cls_out = single_row_attention(
        q.cls,
        [
            (k_cls, v_cls, ones_Dx1),
            (kq_D, vq_D, qmask_D & config.cls_query_attention),
            (k.doc, v.doc, doc_mask_DxLd & config.cls_doc_attention),
        ],
    )

    if config.query_is_shared:
        query_out = segment_attention(q.query, [(k.query, v.query, query_mask_QxLq)])
    else:
        query_out = segment_attention(
            q.query,
            [
                (k.query, v.query, query_mask_QxLq),
                (k_cls, v_cls, ones_Dx1 if config.query_cls_attention else false_Dx1),
                (k.doc, v.doc, doc_mask_DxLd & config.query_doc_attention),
            ],
        )

    global_mask = jnp.concatenate(
        [ones_Dx1 if config.doc_cls_attention else false_Dx1, qmask_D & config.doc_query_attention], axis=1
    )
    doc_out = doc_attention(
        q.doc,
        k.doc,
        v.doc,
        jnp.concatenate([k_cls, kq_D], axis=1),
        jnp.concatenate([v_cls, vq_D], axis=1),
        doc_mask_DxLd,
        global_mask,
        window=config.attention_window_size,
        impl=impl,
        interpret=interpret,
    )
    return Groups(cls_out, query_out, doc_out)
