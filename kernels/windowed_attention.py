"""Fused Pallas kernels for the document rows of the sparse cross-encoder's attention (the `doc_attention`
contract in docs/architecture.md).

Row i of a document attends, in one float32 softmax scaled by 1/sqrt(K), to the document keys j with
|i - j| <= window and doc_mask[j], and to the valid global keys ([CLS], query). Score tiles live only in
registers/shared memory: the forward writes the output and one log-sum-exp per row; the backward recomputes
the probabilities from it (flash-attention style) in two kernels, one for dq (and the global keys' gradients)
and one for the document keys' dk/dv.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from sce_jax.kernels.block_config import BlockConfig, shipped_block_config

# Finite, so a tile whose keys are all masked yields no inf - inf = NaN in the running max.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Compile-time parameters of one call (hashable: passed as a non-differentiable custom_vjp argument)."""

    window: int | None  # None: every document key is in the band
    scale: float
    config: BlockConfig
    interpret: bool


def windowed_attention(
    q_DxLxHxK,
    k_DxLxHxK,
    v_DxLxHxK,
    k_global_DxGxHxK,
    v_global_DxGxHxK,
    doc_mask_DxL,
    global_mask_DxG,
    *,
    window: int | None,
    config: BlockConfig | None = None,
    interpret: bool = False,
):
    """Document-row attention as fused Pallas kernels; same contract as `sce_jax.attention.doc_attention`.

    Any document length, number of global keys and head size: inputs are padded to the tile sizes here and
    the padding is masked. `config`: the tiles; by default the shipped ones for the dtype and head size
    (`shipped_block_config`), which compile without register spills. Under a mesh set with `jax.set_mesh`, the call is wrapped in `shard_map` over the
    document axis, because XLA cannot partition an opaque kernel (it would gather every shard instead).
    `interpret=True` runs the kernels in the Pallas interpreter (CPU).
    """
    D, L, H, K = q_DxLxHxK.shape
    if k_DxLxHxK.shape != q_DxLxHxK.shape or v_DxLxHxK.shape != q_DxLxHxK.shape:
        raise ValueError(f"q, k, v must share one shape [D, L, H, K], got {q_DxLxHxK.shape}, "
                         f"{k_DxLxHxK.shape}, {v_DxLxHxK.shape}")
    G = k_global_DxGxHxK.shape[1]
    if k_global_DxGxHxK.shape != (D, G, H, K) or v_global_DxGxHxK.shape != (D, G, H, K):
        raise ValueError(f"k_global and v_global must be [D, G, H, K] = [{D}, G, {H}, {K}], got "
                         f"{k_global_DxGxHxK.shape}, {v_global_DxGxHxK.shape}")
    if doc_mask_DxL.shape != (D, L) or global_mask_DxG.shape != (D, G):
        raise ValueError(f"doc_mask must be [D, L] = [{D}, {L}] and global_mask [D, G] = [{D}, {G}], got "
                         f"{doc_mask_DxL.shape}, {global_mask_DxG.shape}")
    if window is not None and window < 1:
        raise ValueError(f"window must be an int >= 1 or None, got {window}")

    static = _Static(
        window=None if window is None or window >= L else int(window),
        scale=1.0 / math.sqrt(K),
        config=(config or shipped_block_config(q_DxLxHxK.dtype, K)).fitted(L),
        interpret=interpret,
    )
    attend = functools.partial(_padded_attention, static=static)
    mesh = jax.sharding.get_abstract_mesh()
    document_axes = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    if document_axes:
        devices = math.prod(mesh.shape[a] for a in document_axes)
        if D % devices:
            raise ValueError(f"{D} documents cannot be split evenly over the {devices} devices of mesh axes "
                             f"{document_axes}; pad the batch to a multiple of {devices}")
        spec = PartitionSpec(document_axes)
        # check_vma off: the Pallas interpreter (interpret=True) evaluates the kernel body with the inputs'
        # varying-axes types and rejects mixing them with the body's constants and iotas.
        attend = jax.shard_map(
            attend, in_specs=spec, out_specs=spec, axis_names=set(document_axes), check_vma=False
        )
    return attend(q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, k_global_DxGxHxK, v_global_DxGxHxK, doc_mask_DxL,
                  global_mask_DxG)


def _pad_axis(x, axis: int, size: int):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _padded_attention(q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK, doc_mask_DxL, global_mask_DxG,
                      *, static: _Static):
    """Pads to the shapes Triton needs (power-of-two tiles; padded keys are masked, padded rows sliced off)."""
    _, L, _, K = q_DxLxHxK.shape
    G = kg_DxGxHxK.shape[1]
    tile = max(static.config.block_q, static.config.block_k)
    Lp = -(-L // tile) * tile
    Gp = max(16, pl.next_power_of_2(G))
    Kp = max(16, pl.next_power_of_2(K))
    doc = [_pad_axis(_pad_axis(x, 1, Lp), 3, Kp) for x in (q_DxLxHxK, k_DxLxHxK, v_DxLxHxK)]
    glob = [_pad_axis(_pad_axis(x, 1, Gp), 3, Kp) for x in (kg_DxGxHxK, vg_DxGxHxK)]
    # Masks travel as int32: Triton has no boolean memory type.
    doc_mask_DxLp = _pad_axis(doc_mask_DxL.astype(jnp.int32), 1, Lp)
    global_mask_DxGp = _pad_axis(global_mask_DxG.astype(jnp.int32), 1, Gp)
    out_DxLpxHxKp = _fused_attention(*doc, *glob, doc_mask_DxLp, global_mask_DxGp, static)
    return out_DxLpxHxKp[:, :L, :, :K]


# --- tile arithmetic shared by the kernels --------------------------------------------------------------------


# float32 tiles multiply in full float32: Triton's default for float32 dots is TF32 (10-bit mantissas), which
# HIGHEST turns off (the lowered tt.dot's inputPrecision is ieee; tests/test_kernels.py checks it). bfloat16
# tiles are unaffected and use the tensor cores.
_FULL_FLOAT32 = lax.Precision.HIGHEST


def _scores(a_MxK, b_NxK, scale: float):
    """a @ b.T, accumulated in float32."""
    dims = (((1,), (1,)), ((), ()))
    return lax.dot_general(a_MxK, b_NxK, dims, precision=_FULL_FLOAT32, preferred_element_type=jnp.float32) * scale


def _mix(p_MxN, b_NxK):
    """p @ b in float32, p cast to b's dtype (Triton dots need equal operand types)."""
    return jnp.dot(p_MxN.astype(b_NxK.dtype), b_NxK, precision=_FULL_FLOAT32, preferred_element_type=jnp.float32)


def _mix_transposed(p_MxN, b_MxK):
    """p.T @ b in float32, p cast to b's dtype."""
    dims = (((0,), (0,)), ((), ()))
    return lax.dot_general(p_MxN.astype(b_MxK.dtype), b_MxK, dims, precision=_FULL_FLOAT32,
                           preferred_element_type=jnp.float32)


def _doc_visible(rows_M, cols_N, key_mask_N, window: int | None):
    """[M, N] visibility of document keys `cols` for rows `rows`: in the band and a real token."""
    visible = jnp.broadcast_to(key_mask_N[None, :] > 0, (rows_M.shape[0], cols_N.shape[0]))
    if window is None:
        return visible
    return visible & (jnp.abs(rows_M[:, None] - cols_N[None, :]) <= window)


def _block_range(start, span: int, window: int | None, block: int, length: int):
    """[first, last) indices of the `block`-sized tiles of the other side that rows [start, start + span) can
    reach through the band (the band is symmetric, so this serves keys-of-a-query-tile and queries-of-a-key-
    tile alike)."""
    if window is None:
        return 0, length // block
    first = lax.div(jnp.maximum(start - window, 0), block)
    last = lax.div(jnp.minimum(start + span - 1 + window, length - 1), block) + 1
    return first, last


# --- forward ----------------------------------------------------------------------------------------------------


def _forward_kernel(q_ref, k_ref, v_ref, kg_ref, vg_ref, doc_mask_ref, global_mask_ref, out_ref, lse_ref, *,
                    static: _Static):
    block_q, block_k = static.config.block_q, static.config.block_k
    length = k_ref.shape[0]
    start = pl.program_id(2) * block_q
    rows = start + jnp.arange(block_q)
    q = q_ref[...]

    # The global keys open the online softmax; rows with no visible key keep l == 0.
    global_visible = jnp.broadcast_to(global_mask_ref[...][None, :] > 0, (block_q, kg_ref.shape[0]))
    s = jnp.where(global_visible, _scores(q, kg_ref[...], static.scale), _MASK_VALUE)
    m = jnp.max(s, axis=1)
    p = jnp.where(global_visible, jnp.exp(s - m[:, None]), 0.0)
    l = jnp.sum(p, axis=1)
    acc = _mix(p, vg_ref[...])

    def visit_key_block(kb, carry):
        acc, m, l = carry
        keys = pl.ds(kb * block_k, block_k)
        visible = _doc_visible(rows, kb * block_k + jnp.arange(block_k), doc_mask_ref[keys], static.window)
        s = jnp.where(visible, _scores(q, k_ref[keys, :], static.scale), _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        rescale = jnp.exp(m - m_new)
        return acc * rescale[:, None] + _mix(p, v_ref[keys, :]), m_new, l * rescale + jnp.sum(p, axis=1)

    first, last = _block_range(start, block_q, static.window, block_k, length)
    acc, m, l = lax.fori_loop(first, last, visit_key_block, (acc, m, l))
    seen = l > 0
    out_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def _out_struct(like, shape, dtype):
    """An output struct that varies over the same shard_map axes as `like` (shard_map's check_vma needs it).

    Spelled out: `jax.ShapeDtypeStruct.like(like).update(...)` does the same from jax 0.10.2, but 0.10.1 has no
    `like`."""
    manual = jax.typeof(like).mat
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=None if manual.empty else manual)


def _row_spec(block: int, head_dim: int):
    return pl.BlockSpec((pl.squeezed, block, pl.squeezed, head_dim), lambda d, h, i: (d, i, h, 0))


def _whole_spec(length: int, head_dim: int):
    return pl.BlockSpec((pl.squeezed, length, pl.squeezed, head_dim), lambda d, h, i: (d, 0, h, 0))


def _mask_spec(length: int):
    return pl.BlockSpec((pl.squeezed, length), lambda d, h, i: (d, 0))


def _query_block_specs(block_q: int, length: int, num_global: int, head_dim: int):
    """Inputs of a kernel over query-row blocks: q rows, whole k, v, global k, v, document and global masks."""
    whole = _whole_spec(length, head_dim)
    global_keys = _whole_spec(num_global, head_dim)
    return [_row_spec(block_q, head_dim), whole, whole, global_keys, global_keys, _mask_spec(length), _mask_spec(num_global)]


def _per_row_spec(block: int):
    """Tiles of a [D, H, L] per-row statistic (log-sum-exp, delta)."""
    return pl.BlockSpec((pl.squeezed, pl.squeezed, block), lambda d, h, i: (d, h, i))


def _whole_per_row_spec(length: int):
    return pl.BlockSpec((pl.squeezed, pl.squeezed, length), lambda d, h, i: (d, h, 0))


def _forward(q, k, v, kg, vg, doc_mask, global_mask, static: _Static):
    D, Lp, H, Kp = q.shape
    Gp = kg.shape[1]
    block_q = static.config.block_q
    return pl.pallas_call(
        functools.partial(_forward_kernel, static=static),
        grid=(D, H, Lp // block_q),
        in_specs=_query_block_specs(block_q, Lp, Gp, Kp),
        out_specs=[_row_spec(block_q, Kp), _per_row_spec(block_q)],
        out_shape=[_out_struct(q, q.shape, q.dtype), _out_struct(q, (D, H, Lp), jnp.float32)],
        compiler_params=static.config.compiler_params(),
        interpret=static.interpret,
        name="doc_attention_forward",
    )(q, k, v, kg, vg, doc_mask, global_mask)


# --- backward ---------------------------------------------------------------------------------------------------


def _dq_kernel(q_ref, k_ref, v_ref, kg_ref, vg_ref, doc_mask_ref, global_mask_ref, dout_ref, lse_ref, delta_ref,
               dq_ref, dkg_ref, dvg_ref, *, static: _Static):
    """dq of one query tile, plus this tile's share of the global keys' dk/dv (summed over tiles outside)."""
    block_q, block_k = static.config.block_q, static.config.block_k
    length = k_ref.shape[0]
    start = pl.program_id(2) * block_q
    rows = start + jnp.arange(block_q)
    q, dout = q_ref[...], dout_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    kg = kg_ref[...]
    global_visible = jnp.broadcast_to(global_mask_ref[...][None, :] > 0, (block_q, kg.shape[0]))
    p = jnp.where(global_visible, jnp.exp(_scores(q, kg, static.scale) - lse), 0.0)
    ds = p * (_scores(dout, vg_ref[...], 1.0) - delta)
    dkg_ref[...] = _mix_transposed(ds, q) * static.scale
    dvg_ref[...] = _mix_transposed(p, dout)
    dq = _mix(ds, kg)

    def visit_key_block(kb, dq):
        keys = pl.ds(kb * block_k, block_k)
        visible = _doc_visible(rows, kb * block_k + jnp.arange(block_k), doc_mask_ref[keys], static.window)
        k = k_ref[keys, :]
        p = jnp.where(visible, jnp.exp(_scores(q, k, static.scale) - lse), 0.0)
        ds = p * (_scores(dout, v_ref[keys, :], 1.0) - delta)
        return dq + _mix(ds, k)

    first, last = _block_range(start, block_q, static.window, block_k, length)
    dq = lax.fori_loop(first, last, visit_key_block, dq)
    dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, doc_mask_ref, dout_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                static: _Static):
    """dk, dv of one document key tile, visiting the query tiles whose band reaches it."""
    block_q, block_k = static.config.block_q, static.config.block_k
    length = q_ref.shape[0]
    start = pl.program_id(2) * block_k
    cols = start + jnp.arange(block_k)
    k, v = k_ref[...], v_ref[...]
    key_mask = doc_mask_ref[pl.ds(start, block_k)]

    def visit_query_block(qb, carry):
        dk, dv = carry
        queries = pl.ds(qb * block_q, block_q)
        q, dout = q_ref[queries, :], dout_ref[queries, :]
        visible = _doc_visible(qb * block_q + jnp.arange(block_q), cols, key_mask, static.window)
        p = jnp.where(visible, jnp.exp(_scores(q, k, static.scale) - lse_ref[queries][:, None]), 0.0)
        ds = p * (_scores(dout, v, 1.0) - delta_ref[queries][:, None])
        return dk + _mix_transposed(ds, q), dv + _mix_transposed(p, dout)

    zeros = jnp.zeros(k.shape, jnp.float32)
    first, last = _block_range(start, block_k, static.window, block_q, length)
    dk, dv = lax.fori_loop(first, last, visit_query_block, (zeros, zeros))
    dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(static: _Static, residuals, dout):
    q, k, v, kg, vg, doc_mask, global_mask, out, lse = residuals
    D, Lp, H, Kp = q.shape
    Gp = kg.shape[1]
    block_q, block_k = static.config.block_q, static.config.block_k
    n_query_blocks = Lp // block_q
    # delta_i = sum_k out_ik * dout_ik: the softmax Jacobian's row term, an elementwise pass XLA fuses.
    delta_DxHxLp = jnp.einsum("dlhk,dlhk->dhl", out.astype(jnp.float32), dout.astype(jnp.float32),
                              precision=_FULL_FLOAT32)
    part_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, Gp, Kp), lambda d, h, i: (d, h, i, 0, 0))
    part_shape = _out_struct(q, (D, H, n_query_blocks, Gp, Kp), jnp.float32)
    dq, dkg_parts, dvg_parts = pl.pallas_call(
        functools.partial(_dq_kernel, static=static),
        grid=(D, H, n_query_blocks),
        in_specs=[
            *_query_block_specs(block_q, Lp, Gp, Kp),
            _row_spec(block_q, Kp),
            _per_row_spec(block_q),
            _per_row_spec(block_q),
        ],
        out_specs=[_row_spec(block_q, Kp), part_spec, part_spec],
        out_shape=[_out_struct(q, q.shape, q.dtype), part_shape, part_shape],
        compiler_params=static.config.compiler_params(),
        interpret=static.interpret,
        name="doc_attention_backward_dq",
    )(q, k, v, kg, vg, doc_mask, global_mask, dout, lse, delta_DxHxLp)

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, static=static),
        grid=(D, H, Lp // block_k),
        in_specs=[
            _whole_spec(Lp, Kp),
            _row_spec(block_k, Kp),
            _row_spec(block_k, Kp),
            _mask_spec(Lp),
            _whole_spec(Lp, Kp),
            _whole_per_row_spec(Lp),
            _whole_per_row_spec(Lp),
        ],
        out_specs=[_row_spec(block_k, Kp), _row_spec(block_k, Kp)],
        out_shape=[_out_struct(k, k.shape, k.dtype), _out_struct(v, v.shape, v.dtype)],
        compiler_params=static.config.compiler_params(),
        interpret=static.interpret,
        name="doc_attention_backward_dkv",
    )(q, k, v, doc_mask, dout, lse, delta_DxHxLp)

    dkg = jnp.einsum("dhngk->dghk", dkg_parts).astype(kg.dtype)
    dvg = jnp.einsum("dhngk->dghk", dvg_parts).astype(vg.dtype)
    return dq, dk, dv, dkg, dvg, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused_attention(q, k, v, kg, vg, doc_mask, global_mask, static: _Static):
    return _forward(q, k, v, kg, vg, doc_mask, global_mask, static)[0]


def _fused_attention_fwd(q, k, v, kg, vg, doc_mask, global_mask, static: _Static):
    out, lse = _forward(q, k, v, kg, vg, doc_mask, global_mask, static)
    return out, (q, k, v, kg, vg, doc_mask, global_mask, out, lse)


_fused_attention.defvjp(_fused_attention_fwd, _backward)
