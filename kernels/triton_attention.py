"""The document rows' attention forward as a Triton kernel, called from JAX through jax_triton (the route off the
deprecated Pallas Triton backend; docs/kernels.md, "Backend").

Same contract as `windowed_attention`'s forward (docs/architecture.md): row i of a document attends in one float32
softmax, scaled by 1/sqrt(K), to the document keys j with |i - j| <= window and doc_mask[j], and to the valid
global keys ([CLS], query). Forward only: `sce_jax.attention` differentiates the XLA path for the backward. Needs
the `triton` and `jax-triton` packages (the `triton` extra; jax-triton needs Python >= 3.12) and a GPU; on CPU the
kernel itself runs in Triton's interpreter (`TRITON_INTERPRET=1`, torch tensors), which is how it is tested.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import triton
import triton.language as tl

# Finite, so a tile whose keys are all masked yields no inf - inf = NaN in the running max.
MASK_VALUE = tl.constexpr(-0.7 * float(np.finfo(np.float32).max))
# Query rows per program and key rows per step, launch settings: 0 bytes of register spills for sm_80 and sm_90,
# float32 and bfloat16, heads of 32 and 64 (benchmarks/triton_forward.py --compile).
TILES = {"float32": dict(BLOCK_Q=32, BLOCK_K=16, num_warps=4, num_stages=2),
         "bfloat16": dict(BLOCK_Q=64, BLOCK_K=32, num_warps=4, num_stages=2)}


@triton.jit
def doc_attention_forward(q_ptr, k_ptr, v_ptr, kg_ptr, vg_ptr, doc_mask_ptr, global_mask_ptr, out_ptr, lse_ptr,
                          L: tl.constexpr, G: tl.constexpr, H: tl.constexpr, scale: tl.constexpr,
                          window: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_G: tl.constexpr, HEAD: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_Q rows of one head of one document. q, k, v, out: [D, L, H, HEAD]; kg, vg: [D, G, H,
    HEAD]; doc_mask [D, L] and global_mask [D, G] int32; lse [D, H, L] float32. window < 0: full attention."""
    qb, h, d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, HEAD)
    doc_base = d * L * H * HEAD + h * HEAD
    q = tl.load(q_ptr + doc_base + rows[:, None] * (H * HEAD) + dims[None, :], mask=rows[:, None] < L, other=0.0)

    # The global keys ([CLS], query) open the online softmax; rows with no visible key keep l == 0.
    g = tl.arange(0, BLOCK_G)
    global_offsets = d * G * H * HEAD + h * HEAD + g[:, None] * (H * HEAD) + dims[None, :]
    kg = tl.load(kg_ptr + global_offsets, mask=g[:, None] < G, other=0.0)
    vg = tl.load(vg_ptr + global_offsets, mask=g[:, None] < G, other=0.0)
    global_visible = (tl.load(global_mask_ptr + d * G + g, mask=g < G, other=0) > 0)[None, :]
    s = tl.where(global_visible, tl.dot(q, tl.trans(kg), input_precision=PRECISION) * scale, MASK_VALUE)
    m = tl.max(s, 1)
    p = tl.where(global_visible, tl.exp(s - m[:, None]), 0.0)
    l = tl.sum(p, 1)
    acc = tl.dot(p.to(vg.dtype), vg, input_precision=PRECISION)

    # The document key tiles the band [first row - window, last row + window] reaches.
    if window < 0:
        lo, hi = 0, L
    else:
        lo = tl.maximum(qb * BLOCK_Q - window, 0) // BLOCK_K * BLOCK_K
        hi = tl.minimum(qb * BLOCK_Q + BLOCK_Q + window, L)
    for start in range(lo, hi, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        key_offsets = doc_base + cols[:, None] * (H * HEAD) + dims[None, :]
        k = tl.load(k_ptr + key_offsets, mask=cols[:, None] < L, other=0.0)
        v = tl.load(v_ptr + key_offsets, mask=cols[:, None] < L, other=0.0)
        visible = (tl.load(doc_mask_ptr + d * L + cols, mask=cols < L, other=0) > 0)[None, :]
        if window >= 0:
            visible = visible & (tl.abs(rows[:, None] - cols[None, :]) <= window)
        s_tile = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, MASK_VALUE)
        m_new = tl.maximum(m, tl.max(s_tile, 1))
        p_tile = tl.where(visible, tl.exp(s_tile - m_new[:, None]), 0.0)
        rescale = tl.exp(m - m_new)
        acc = acc * rescale[:, None] + tl.dot(p_tile.to(v.dtype), v, input_precision=PRECISION)
        l = l * rescale + tl.sum(p_tile, 1)
        m = m_new
    seen = l > 0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    tl.store(out_ptr + doc_base + rows[:, None] * (H * HEAD) + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rows[:, None] < L)
    tl.store(lse_ptr + (d * H + h) * L + rows, tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), 0.0), mask=rows < L)


def kernel_settings(length: int, num_global: int, heads: int, head_dim: int, window: int | None, dtype) -> dict:
    """Compile-time parameters and launch settings for one call (HEAD: the head size as passed, a power of two
    >= 16; float32 dots in full float32: Triton's default would be TF32)."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    tiles = dict(TILES[name])
    tiles["BLOCK_Q"] = min(tiles["BLOCK_Q"], max(16, triton.next_power_of_2(length)))
    tiles["BLOCK_K"] = min(tiles["BLOCK_K"], max(16, triton.next_power_of_2(length)))
    return dict(L=length, G=num_global, H=heads, scale=1.0 / math.sqrt(head_dim),
                window=-1 if window is None or window >= length else int(window),
                BLOCK_G=max(16, triton.next_power_of_2(num_global)), HEAD=max(16, triton.next_power_of_2(head_dim)),
                PRECISION="ieee" if name == "float32" else "tf32", **tiles)


def triton_forward(q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK, doc_mask_DxL, global_mask_DxG, *,
                   window: int | None):
    """The attention output [D, L, H, K] through `jax_triton.triton_call` (one program per query tile, head and
    document). Under a mesh set with `jax.set_mesh` the call runs per device shard of the documents (`shard_map`),
    as `windowed_attention` does: XLA cannot partition an opaque kernel."""
    import jax
    from jax.sharding import PartitionSpec

    attend = functools.partial(_call, window=window)
    mesh = jax.sharding.get_abstract_mesh()
    document_axes = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    if document_axes:
        devices = math.prod(mesh.shape[a] for a in document_axes)
        if q_DxLxHxK.shape[0] % devices:
            raise ValueError(f"{q_DxLxHxK.shape[0]} documents cannot be split evenly over the {devices} devices of "
                             f"mesh axes {document_axes}; pad the batch to a multiple of {devices}")
        spec = PartitionSpec(document_axes)
        attend = jax.shard_map(attend, in_specs=spec, out_specs=spec, axis_names=set(document_axes), check_vma=False)
    return attend(q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK, doc_mask_DxL, global_mask_DxG)


def _call(q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK, doc_mask_DxL, global_mask_DxG, *, window):
    """One device's call. The head size is padded to a power of two >= 16 (zero columns change no dot product)."""
    import jax
    import jax.numpy as jnp
    import jax_triton

    D, L, H, K = q_DxLxHxK.shape
    settings = kernel_settings(L, kg_DxGxHxK.shape[1], H, K, window, q_DxLxHxK.dtype)
    widths = ((0, 0), (0, 0), (0, 0), (0, settings["HEAD"] - K))
    padded = [jnp.pad(x, widths) for x in (q_DxLxHxK, k_DxLxHxK, v_DxLxHxK, kg_DxGxHxK, vg_DxGxHxK)]
    out_shape = [jax.ShapeDtypeStruct(padded[0].shape, q_DxLxHxK.dtype), jax.ShapeDtypeStruct((D, H, L), jnp.float32)]
    out, _ = jax_triton.triton_call(
        *padded, doc_mask_DxL.astype(jnp.int32), global_mask_DxG.astype(jnp.int32),
        kernel=doc_attention_forward, out_shape=out_shape, grid=(triton.cdiv(L, settings["BLOCK_Q"]), H, D),
        **settings)
    return out[..., :K]
