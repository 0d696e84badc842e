"""Attention of one layer over the three token groups: [CLS] (one per document), query, document.

Tensors use the layout [batch, tokens, heads, head_dim] (`..._DxLxHxK`), the layout the projections produce,
so no transposes are needed. Scores and softmax are float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sce_jax.config import ATTENTION_IMPLS, SparseCrossEncoderConfig


# Mask value for scores: finite so fully masked rows stay NaN-free (they are zeroed explicitly).
_NEG = -1e30

logger = logging.getLogger("sce_jax.attention")

# Implementations without dropout on attention probabilities: training with that dropout runs the XLA path.
_NO_PROB_DROPOUT = ("cpu", "pallas", "triton")


class ProbDropout(NamedTuple):
    """Dropout on attention probabilities (BERT's `attention_probs_dropout_prob`): every probability is zeroed
    with probability `rate`, the others scaled by 1 / (1 - rate). `rng` is one layer's key; each group of rows
    ([CLS], query, document) draws its mask from its own fold of it (`site`)."""

    rate: float
    rng: jax.Array

    def site(self, index: int) -> ProbDropout:
        return ProbDropout(self.rate, jax.random.fold_in(self.rng, index))


# Site numbers folded into a layer's attention-dropout key.
CLS_SITE, QUERY_SITE, DOC_SITE = 0, 1, 2


def drop_probs(probs: jax.Array, dropout: ProbDropout | None) -> jax.Array:
    """`probs` with dropout applied (unchanged for None)."""
    if dropout is None:
        return probs
    keep = keep_mask(dropout.rng, dropout.rate, probs.shape)
    return jnp.where(keep, probs * (1.0 / (1.0 - dropout.rate)), 0.0).astype(probs.dtype)


def keep_mask(rng: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """True where a value is kept: each is dropped with probability round(rate * 2^16) / 2^16 (within 8e-6 of
    `rate`; 0.1 -> 6554/65536), from 16 random bits per value, two values per 32-bit draw: half the random numbers
    of `jax.random.bernoulli`, which made attention dropout cost ~11% of a training step on CPU."""
    size = math.prod(shape)
    words = jax.random.bits(rng, ((size + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size]
    return (halves >= round(rate * 65536)).reshape(shape)


def training_attention_impl(impl: str) -> str:
    """The implementation that runs while attention probabilities are dropped: `impl`, or the XLA path for the
    C++, Pallas and Triton kernels (which have no dropout), said once in the log at INFO."""
    resolved = resolve_attention_impl(impl)
    if resolved not in _NO_PROB_DROPOUT:
        return resolved
    _log_once(f"attention_impl {resolved!r} has no attention-probability dropout: training runs the XLA attention "
              f"path (inference keeps {resolved!r})")
    return "xla"


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


class Groups(NamedTuple):
    """Per-group tensors: `cls` [D, ...], `query` [Q, Lq, ...] (Q = D when not shared), `doc` [D, Ld, ...]."""

    cls: jax.Array
    query: jax.Array
    doc: jax.Array


class TokenLayout:
    """Where each group sits in the model's flat token matrix ([CLS] rows, query tokens, document rows), and how
    to split it back."""

    def __init__(self, num_rows: int, slots: int, num_queries: int, query_length: int, row_length: int):
        self.shapes = ((num_rows, slots), (num_queries, query_length), (num_rows, row_length))
        self.sizes = [num_rows * slots, num_queries * query_length, num_rows * row_length]
        # The [CLS] and query rows come first; document rows start here.
        self.query_end = self.sizes[0] + self.sizes[1]

    def split(self, x_TxF: jax.Array) -> Groups:
        cls_end, query_end = self.sizes[0], self.query_end
        parts = (x_TxF[:cls_end], x_TxF[cls_end:query_end], x_TxF[query_end:])
        return Groups(*(p.reshape(*shape, *x_TxF.shape[1:]) for p, shape in zip(parts, self.shapes)))

    def join(self, groups: Groups) -> jax.Array:
        return jnp.concatenate([g.reshape(size, *g.shape[len(s):]) for g, size, s in zip(groups, self.sizes, self.shapes)])

    def states(self, x_TxF: jax.Array) -> Groups:
        """Hidden states per group, [CLS] as one row per document slot."""
        groups = self.split(x_TxF)
        return groups._replace(cls=groups.cls.reshape(-1, *groups.cls.shape[2:]))


# Whether "auto" picks the Pallas kernel on GPU. It has been lowered for CUDA and run in interpret mode, but
# never compiled or run on a GPU; until it has been validated there, "auto" takes the XLA path on GPU and the
# kernel is an explicit choice (attention_impl="pallas").
PALLAS_VALIDATED_ON_GPU = False


def resolve_attention_impl(impl: str) -> str:
    """Turn "auto" into a concrete implementation for the default backend: the C++ kernel on CPU (the XLA path,
    with a warning, where it cannot be built), the XLA path elsewhere, GPU included (see
    PALLAS_VALIDATED_ON_GPU)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
    backend = jax.default_backend()
    if impl == "auto":
        if backend == "gpu" and PALLAS_VALIDATED_ON_GPU:
            return "pallas"
        if backend != "cpu":
            return "xla"
        ok, why = _cpu_kernel_available()
        if not ok:
            _warn_once(f"the CPU attention kernel is unavailable, using attention_impl='xla' (slower): {why}")
        return "cpu" if ok else "xla"
    if impl == "cpu":
        ok, why = _cpu_kernel_available()
        if not ok:
            raise RuntimeError(f"attention_impl='cpu': {why}")
    return impl


def _cpu_kernel_available() -> tuple[bool, str]:
    from sce_jax.kernels import cpu_attention

    return cpu_attention.available()


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to `mask`; rows without a visible key give all zeros."""
    scores = jnp.where(mask, scores, _NEG)
    weights = jnp.exp(scores - scores.max(axis=-1, keepdims=True)) * mask
    return weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def _scores(q_DxTxHxK: jax.Array, k_DxSxHxK: jax.Array) -> jax.Array:
    scale = 1.0 / math.sqrt(q_DxTxHxK.shape[-1])
    return jnp.einsum("dthk,dshk->dhts", q_DxTxHxK, k_DxSxHxK, preferred_element_type=jnp.float32) * scale


def segment_attention(q_DxTxHxK, segments, dropout: ProbDropout | None = None) -> jax.Array:
    """Rows attend to the union of several key segments with one joint softmax.

    `segments` is a sequence of (k [D,S,H,K], v [D,S,H,K], mask [D,S]); scores are concatenated rather than keys,
    which copies only the (small) score rows of [CLS] and query tokens.
    """
    scores = jnp.concatenate([_scores(q_DxTxHxK, k) for k, _, _ in segments], axis=-1)
    mask = jnp.concatenate([m for _, _, m in segments], axis=-1)[:, None, None, :]
    probs_DxHxTxS = drop_probs(_masked_softmax(scores, mask), dropout)
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
    doc_slot_DxL: jax.Array | None = None,
    global_slot_DxG: jax.Array | None = None,
    dropout: ProbDropout | None = None,
) -> jax.Array:
    """Document rows: ±window document keys plus global ([CLS], query) keys, one softmax.

    For rows holding several documents, `doc_slot_DxL` gives each token's document (-1: padding) and
    `global_slot_DxG` each global key's (-1: every document of the row); a token then sees only keys of its own
    document. None means one document per row.

    impl "dense" builds the full [L, L] band mask (the readable reference), "xla" computes only the band
    (`_blocked_doc_attention`, memory O(L·(block + 2·window))), "pallas" runs the fused GPU kernel, "triton" the
    Triton forward kernel (through jax_triton; GPU only) with the XLA path's backward. With `dropout` (training)
    the kernels give way to the XLA path (`training_attention_impl`).
    """
    impl = resolve_attention_impl(impl) if dropout is None else training_attention_impl(impl)
    length = q_DxLxHxK.shape[1]
    segments = (doc_slot_DxL, global_slot_DxG)
    if impl == "pallas":
        from sce_jax.kernels.windowed_attention import windowed_attention

        if doc_slot_DxL is not None:
            raise ValueError("the Pallas kernel takes one document per row")

        return windowed_attention(
            q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK, doc_mask_DxL, global_mask_DxG,
            window=window, interpret=interpret,
        )
    if impl == "triton":
        if doc_slot_DxL is not None:
            raise ValueError("the Triton kernel takes one document per row")
        return _triton_doc_attention(
            q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK, doc_mask_DxL, global_mask_DxG, window
        )
    if impl == "dense" or window is None or window >= length - 1:
        return _dense_doc_attention(
            q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK, doc_mask_DxL, global_mask_DxG, window, *segments,
            dropout=dropout,
        )
    return _blocked_doc_attention(
        q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK, doc_mask_DxL, global_mask_DxG, window, *segments,
        dropout=dropout,
    )


def _triton_doc_attention(q, k, v, kg, vg, doc_mask_DxL, global_mask_DxG, window):
    """The Triton forward kernel; its gradients are the XLA path's (which recomputes the same function)."""
    from sce_jax.kernels.triton_attention import triton_forward

    def reference(q, k, v, kg, vg):
        return doc_attention(q, k, v, kg, vg, doc_mask_DxL, global_mask_DxG, window=window, impl="xla")

    @jax.custom_vjp
    def attend(q, k, v, kg, vg):
        return triton_forward(q, k, v, kg, vg, doc_mask_DxL, global_mask_DxG, window=window)

    def attend_fwd(*inputs):
        return attend(*inputs), inputs

    def attend_bwd(inputs, grad):
        return jax.vjp(reference, *inputs)[1](grad)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend(q, k, v, kg, vg)


def _dense_doc_attention(
    q, k, v, kg, vg, doc_mask_DxL, global_mask_DxG, window, doc_slot_DxL=None, global_slot_DxG=None, *, dropout=None
):
    length = q.shape[1]
    pos = jnp.arange(length)
    band_LxL = jnp.ones((length, length), bool) if window is None else abs(pos[:, None] - pos[None, :]) <= window
    local_mask = band_LxL[None, None] & doc_mask_DxL[:, None, None, :]
    global_mask = global_mask_DxG[:, None, None, :]
    if doc_slot_DxL is not None:
        local_mask &= doc_slot_DxL[:, None, :, None] == doc_slot_DxL[:, None, None, :]
        global_mask &= _owned(global_slot_DxG, doc_slot_DxL)[:, None]
    global_mask = jnp.broadcast_to(global_mask, (*local_mask.shape[:3], kg.shape[1]))
    scores = jnp.concatenate([_scores(q, kg), _scores(q, k)], axis=-1)
    probs = drop_probs(_masked_softmax(scores, jnp.concatenate([global_mask, local_mask], axis=-1)), dropout)
    num_global = kg.shape[1]
    out = jnp.einsum("dhts,dshk->dthk", probs[..., :num_global].astype(vg.dtype), vg, preferred_element_type=jnp.float32)
    out += jnp.einsum("dhts,dshk->dthk", probs[..., num_global:].astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _owned(global_slot_DxG, doc_slot_DxL):
    """[D, L, G]: global key g is shared by the row (-1) or belongs to token l's document."""
    owner = global_slot_DxG[:, None, :]
    return (owner < 0) | (owner == doc_slot_DxL[:, :, None])


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


def _blocked_doc_attention(
    q, k, v, kg, vg, doc_mask_DxL, global_mask_DxG, window, doc_slot_DxL=None, global_slot_DxG=None, *, dropout=None
):
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

    def band_keys(x_DxL, fill):
        """[D, L, 2w + 1]: entry o of row r is key r - window + o (`fill` outside the row)."""
        halo_padded = jnp.pad(x_DxL, [(0, 0), (window, window)], constant_values=fill)
        return jnp.stack([halo_padded[:, o : o + length] for o in range(offsets)], axis=-1)

    band_mask_DxLxO = band_keys(doc_mask_DxL, False)
    global_mask = global_mask_DxG[:, None, None, :]
    if doc_slot_DxL is not None:
        band_mask_DxLxO &= band_keys(doc_slot_DxL, -1) == doc_slot_DxL[..., None]
        global_mask &= _owned(global_slot_DxG, doc_slot_DxL)[:, :, None, :]
    band_mask_DxLx1xO = band_mask_DxLxO[:, :, None]

    global_DxLxHxG = jnp.einsum("dlhk,dghk->dlhg", q, kg, preferred_element_type=jnp.float32) * scale
    num_global = kg.shape[1]
    global_mask = jnp.broadcast_to(global_mask, global_DxLxHxG.shape)
    probs = drop_probs(_masked_softmax(
        jnp.concatenate([global_DxLxHxG, band_DxLxHxO], axis=-1),
        jnp.concatenate([global_mask, jnp.broadcast_to(band_mask_DxLx1xO, band_DxLxHxO.shape)], axis=-1),
    ), dropout)
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


def cls_attention(
    q_cls_DxCxHxK: jax.Array,
    k_cls_DxCxHxK: jax.Array,
    v_cls_DxCxHxK: jax.Array,
    kq_DxQxHxK: jax.Array,
    vq_DxQxHxK: jax.Array,
    query_mask_DxQ: jax.Array,
    k_doc_DxLxHxK: jax.Array,
    v_doc_DxLxHxK: jax.Array,
    doc_slot_DxL: jax.Array,
    dropout: ProbDropout | None = None,
) -> jax.Array:
    """[CLS] c of each row attends to itself, the row's query keys (`query_mask`) and the tokens of document slot c
    (`doc_slot`, -1 to hide a token), in one float32 softmax per [CLS] and head.

    The document keys and values stay in the projection's layout (XLA CPU would otherwise transpose every row's
    keys and values). One slot per row: the [CLS] queries of all heads, as a block-diagonal [H, H·K] matrix, meet
    the row's keys in one matmul, and the probabilities its values in another. Several slots: each document token
    meets only its own [CLS], spread over the tokens by a one-hot [C, L] matmul and multiplied elementwise, and
    values are summed back by the same one-hot matmul (a few passes over the tokens, not C matmuls).
    """
    num_rows, slots, heads, head_dim = q_cls_DxCxHxK.shape
    length = k_doc_DxLxHxK.shape[1]
    features = heads * head_dim
    scale = 1.0 / math.sqrt(head_dim)
    k_doc_DxLxF = k_doc_DxLxHxK.reshape(num_rows, length, features)
    v_doc_DxLxF = v_doc_DxLxHxK.reshape(num_rows, length, features)
    onehot_DxCxL = doc_slot_DxL[:, None, :] == jnp.arange(slots)[None, :, None]
    eye_HxH = jnp.eye(heads, dtype=q_cls_DxCxHxK.dtype)
    if slots == 1:
        q_bd_DxHxF = (q_cls_DxCxHxK[:, 0, :, None, :] * eye_HxH[None, :, :, None]).reshape(num_rows, heads, features)
        doc_DxCxHxL = jnp.einsum("dhf,dlf->dhl", q_bd_DxHxF, k_doc_DxLxF, preferred_element_type=jnp.float32)[:, None]
    else:
        own_cls_DxLxF = jnp.einsum(
            "dcl,dcf->dlf", onehot_DxCxL.astype(q_cls_DxCxHxK.dtype), q_cls_DxCxHxK.reshape(num_rows, slots, features)
        )
        doc_DxLxH = jnp.sum(
            own_cls_DxLxF.reshape(k_doc_DxLxHxK.shape).astype(jnp.float32) * k_doc_DxLxHxK.astype(jnp.float32), axis=-1
        )
        doc_DxCxHxL = jnp.broadcast_to(jnp.swapaxes(doc_DxLxH, 1, 2)[:, None], (num_rows, slots, heads, length))
    self_DxCxH = jnp.sum(q_cls_DxCxHxK.astype(jnp.float32) * k_cls_DxCxHxK.astype(jnp.float32), axis=-1)
    query_DxCxHxQ = jnp.einsum("dchk,dqhk->dchq", q_cls_DxCxHxK, kq_DxQxHxK, preferred_element_type=jnp.float32)
    scores = jnp.concatenate([self_DxCxH[..., None], query_DxCxHxQ, doc_DxCxHxL], axis=-1) * scale
    num_query = kq_DxQxHxK.shape[1]
    mask = jnp.concatenate(
        [
            jnp.ones((num_rows, slots, 1), bool),
            jnp.broadcast_to(query_mask_DxQ[:, None], (num_rows, slots, num_query)),
            onehot_DxCxL,
        ],
        axis=-1,
    )[:, :, None]
    probs = drop_probs(_masked_softmax(scores, mask), dropout)  # [D, C, H, 1 + Q + L]
    out = probs[..., 0, None] * v_cls_DxCxHxK.astype(jnp.float32)
    out += jnp.einsum(
        "dchq,dqhk->dchk", probs[..., 1 : 1 + num_query].astype(vq_DxQxHxK.dtype), vq_DxQxHxK,
        preferred_element_type=jnp.float32,
    )
    doc_probs = probs[..., 1 + num_query :]
    if slots == 1:
        # Every head's probabilities against all heads' values; keep each head's own block.
        all_DxHxF = jnp.einsum(
            "dhl,dlf->dhf", doc_probs[:, 0].astype(v_doc_DxLxF.dtype), v_doc_DxLxF, preferred_element_type=jnp.float32
        )
        own_DxHxK = jnp.einsum(
            "dhgk,hg->dhk", all_DxHxF.reshape(num_rows, heads, heads, head_dim), eye_HxH.astype(jnp.float32)
        )
        out += own_DxHxK[:, None]
    else:
        # Each token's weight from its own [CLS] (the other slots' entries are zero).
        token_DxLxH = jnp.swapaxes(doc_probs.sum(axis=1), 1, 2)
        weighted_DxLxF = (token_DxLxH[..., None] * v_doc_DxLxHxK.astype(jnp.float32)).reshape(num_rows, length, features)
        out += jnp.einsum("dcl,dlf->dcf", onehot_DxCxL.astype(jnp.float32), weighted_DxLxF).reshape(out.shape)
    return out.astype(q_cls_DxCxHxK.dtype)


def pattern_cls_attention(
    q_cls_DxCxHxK: jax.Array,
    k: Groups,
    v: Groups,
    query_mask_QxLq: jax.Array,
    doc_slot_DxLd: jax.Array,
    doc_query_D: jax.Array,
    config: SparseCrossEncoderConfig,
    dropout: ProbDropout | None = None,
) -> jax.Array:
    """The [CLS] rows' attention under the config's pattern (what the last layer needs for the scores);
    `dropout`: the layer's (its [CLS] site is used)."""
    return cls_attention(
        q_cls_DxCxHxK, k.cls, v.cls, k.query[doc_query_D], v.query[doc_query_D],
        query_mask_QxLq[doc_query_D] & config.cls_query_attention, k.doc, v.doc,
        jnp.where(config.cls_doc_attention, doc_slot_DxLd, -1),
        dropout=None if dropout is None else dropout.site(CLS_SITE),
    )


def sparse_attention(
    q: Groups,
    k: Groups,
    v: Groups,
    query_mask_QxLq: jax.Array,
    doc_slot_DxLd: jax.Array,
    doc_query_D: jax.Array,
    config: SparseCrossEncoderConfig,
    *,
    impl: str = "xla",
    interpret: bool = False,
    dropout: ProbDropout | None = None,
) -> Groups:
    """One layer's attention for all three groups, following the config's pattern; `dropout` (training): the
    layer's attention-probability dropout, one site per group.

    Rows of documents: `q.cls` is [D, C, ...] (C document slots per row), `doc_slot_DxLd` the slot of each document
    token (-1: padding). `q.query` etc. have Q rows; `doc_query_D` maps rows to them (the identity when the query
    is encoded per document, which needs C = 1).
    """
    num_rows, slots = q.cls.shape[:2]
    doc_mask_DxLd = doc_slot_DxLd >= 0
    slot_C = jnp.arange(slots)
    # Query keys as seen from each row (a gather of Lq rows per row).
    kq_D, vq_D, qmask_D = k.query[doc_query_D], v.query[doc_query_D], query_mask_QxLq[doc_query_D]
    cls_out = pattern_cls_attention(q.cls, k, v, query_mask_QxLq, doc_slot_DxLd, doc_query_D, config, dropout)
    query_dropout = None if dropout is None else dropout.site(QUERY_SITE)

    if config.query_is_shared:
        query_out = segment_attention(q.query, [(k.query, v.query, query_mask_QxLq)], query_dropout)
    else:  # one document per row (the model checks)
        query_out = segment_attention(
            q.query,
            [
                (k.query, v.query, query_mask_QxLq),
                (k.cls, v.cls, jnp.full((num_rows, 1), config.query_cls_attention)),
                (k.doc, v.doc, doc_mask_DxLd & config.query_doc_attention),
            ],
            query_dropout,
        )

    global_mask = jnp.concatenate(
        [jnp.full((num_rows, slots), config.doc_cls_attention), qmask_D & config.doc_query_attention], axis=1
    )
    # With several documents per row, a token sees only its own document's [CLS]; query keys are the row's.
    slot_args = {}
    if slots > 1:
        query_owner = jnp.full(kq_D.shape[:2], -1, jnp.int32)
        slot_args = dict(
            doc_slot_DxL=doc_slot_DxLd,
            global_slot_DxG=jnp.concatenate([jnp.broadcast_to(slot_C, (num_rows, slots)), query_owner], axis=1),
        )
    doc_out = doc_attention(
        q.doc,
        k.doc,
        v.doc,
        jnp.concatenate([k.cls, kq_D], axis=1),
        jnp.concatenate([v.cls, vq_D], axis=1),
        doc_mask_DxLd,
        global_mask,
        window=config.attention_window_size,
        impl=impl,
        interpret=interpret,
        **slot_args,
        dropout=None if dropout is None else dropout.site(DOC_SITE),
    )
    return Groups(cls_out, query_out, doc_out)


def supports_cpu_kernel(config: SparseCrossEncoderConfig) -> bool:
    """The C++ kernel covers windowed patterns whose query sees only itself (the released models'); others
    run the XLA path."""
    return config.query_is_shared and config.attention_window_size is not None


def cpu_layer_attention(
    q_TxPxHxK: jax.Array,
    kv_TxPxHxK: jax.Array,
    query_mask_QxLq: jax.Array,
    doc_slot_DxLd: jax.Array,
    doc_query_D: jax.Array,
    config: SparseCrossEncoderConfig,
    layout: TokenLayout,
    *,
    cls_only: bool = False,
    variant: str | None = None,
) -> jax.Array:
    """One layer's attention over the flat token matrix by the C++ CPU kernel (kernels/cpu_attention.py):
    [tokens, H, K] in the layout's order, or [D·C, H, K] for the [CLS] rows with `cls_only`. `variant`: the
    kernels' build (`sce_jax.kernels.cpu_library`; default: the selected one).

    Queries come from plane 0 of `q_TxPxHxK`, keys and values from the last two planes of `kv_TxPxHxK` (pass the
    QKV projection [tokens, 3, H, K] as both). Gradients go through the XLA path (`sparse_attention`,
    `pattern_cls_attention`), which computes the same function.
    """
    from sce_jax.kernels import cpu_attention as kernel

    flags = (
        kernel.CLS_QUERY * config.cls_query_attention
        | kernel.CLS_DOC * config.cls_doc_attention
        | kernel.DOC_CLS * config.doc_cls_attention
        | kernel.DOC_QUERY * config.doc_query_attention
        | kernel.CLS_ONLY * cls_only
    )

    def reference(q_src, kv_src):
        k, v = (layout.split(kv_src[:, plane]) for plane in (-2, -1))
        masks = (query_mask_QxLq, doc_slot_DxLd, doc_query_D)
        if cls_only:
            return pattern_cls_attention(q_src[:, 0].reshape(k.cls.shape), k, v, *masks, config).reshape(-1, *k.cls.shape[2:])
        return layout.join(sparse_attention(layout.split(q_src[:, 0]), k, v, *masks, config))

    @jax.custom_vjp
    def attend(q_src, kv_src):
        out = kernel.cpu_attention(
            q_src, kv_src, doc_slot_DxLd, doc_query_D, query_mask_QxLq, window=config.attention_window_size, flags=flags,
            variant=variant,
        )
        return out.astype(q_src.dtype)

    def attend_fwd(q_src, kv_src):
        return attend(q_src, kv_src), (q_src, kv_src)

    def attend_bwd(residuals, grad):
        return jax.vjp(reference, *residuals)[1](grad)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend(q_TxPxHxK, kv_TxPxHxK)
