"""One sparse cross-encoder layer's attention on CPU as a fused C++ kernel (an XLA FFI custom call).

`cpu_attention` takes the QKV projection's output for the model's flat token matrix ([CLS] rows, then query
tokens, then document rows; `sce_jax.attention.TokenLayout`) and returns every token's attention output, [tokens, H, K]:
[CLS] sees itself, its query and its document; query tokens see the query; document tokens see their ±window
neighbours of the same document, their [CLS] and the query (each edge switched by the config's flags), one
float32 softmax per token and head. `sce_jax.attention.sparse_attention` is the reference it matches.

The source (cpu_attention.cc) is compiled at install, with the int8 layers' cpu_int8.cc, into one library per
instruction set; `kernels/cpu_library.py` chooses, loads and registers it. `available()` says whether the
kernels run here, and why not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sce_jax.kernels import cpu_library
from sce_jax.kernels.cpu_library import KernelUnavailable, available

__all__ = ["CLS_DOC", "CLS_ONLY", "CLS_QUERY", "DOC_CLS", "DOC_QUERY", "KernelUnavailable", "available", "cpu_attention"]

# Bits of the kernel's `flags` attribute.
CLS_QUERY, CLS_DOC, DOC_CLS, DOC_QUERY, CLS_ONLY = 1, 2, 4, 8, 16


def cpu_attention(
    q_TxPxHxK: jax.Array,
    kv_TxPxHxK: jax.Array,
    doc_slot_DxL: jax.Array,
    doc_query_D: jax.Array,
    query_mask_QxLq: jax.Array,
    *,
    window: int,
    flags: int,
    variant: str | None = None,
) -> jax.Array:
    """Attention outputs [tokens, H, K], or [D·C, H, K] for the [CLS] rows alone with `CLS_ONLY` in `flags`.

    q: plane 0 of [Tq, Pq, H, K] holds the query vectors (Tq = tokens, or at least D·C with CLS_ONLY); kv: planes
    Pkv - 2 and Pkv - 1 of [tokens, Pkv, H, K] hold keys and values (pass the QKV output [tokens, 3, H, K] as both).
    doc_slot: each document token's slot in its row (-1 padding); doc_query: each row's query; query_mask: real
    query tokens. `variant`: which build runs it (`sce_jax.kernels.cpu_library`; default: the selected one).
    float32 only; forward only (sce_jax.attention differentiates through the XLA reference).
    """
    variant = cpu_library.require(variant)
    tokens, _, heads, head_dim = kv_TxPxHxK.shape
    num_rows, row_length = doc_slot_DxL.shape
    num_queries, query_length = query_mask_QxLq.shape
    slots = (tokens - num_queries * query_length - num_rows * row_length) // num_rows
    out_tokens = num_rows * slots if flags & CLS_ONLY else tokens
    out = jax.ShapeDtypeStruct((out_tokens, heads, head_dim), jnp.float32)
    call = jax.ffi.ffi_call(cpu_library.target(variant, "attention"), out)
    return call(
        q_TxPxHxK.astype(jnp.float32),
        kv_TxPxHxK.astype(jnp.float32),
        doc_slot_DxL.astype(jnp.int32),
        doc_query_D.astype(jnp.int32),
        query_mask_QxLq.astype(jnp.int32),
        window=np.int64(window),
        flags=np.int64(flags),
    )
