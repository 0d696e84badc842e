"""Tile sizes of the document-row attention kernel, and the one place that picks the Pallas GPU backend."""

import dataclasses

import numpy as np

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes (powers of two, >= 16: Triton tensors and tensor-core dots need both) and launch settings.

    block_q: query rows per program (forward and dq); block_k: key rows per inner step (forward and dq) and
    key rows per program in the dk/dv kernel. Small windows waste less work with a small block_k.
    """

    block_q: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"BlockConfig.{name} must be a power of two >= 16, got {size}")

    def fitted(self, length: int) -> "BlockConfig":
        """Shrinks the tiles for short documents, so tiny inputs are not padded to a whole default tile."""
        cap = max(16, pl.next_power_of_2(length))
        return dataclasses.replace(self, block_q=min(self.block_q, cap), block_k=min(self.block_k, cap))

    def compiler_params(self) -> pl_triton.CompilerParams:
        """Selects the Pallas Triton backend (see docs/kernels.md for why not Mosaic GPU)."""
        return pl_triton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


# The shipped tiles per compute dtype and head size (padded to a power of two >= 16): the largest found that compile
# with 0 bytes of register spills for sm_80 and sm_90 in forward, dq and dk/dv (benchmarks/gpu_compile.py; the
# measured table and the sweep are in docs/kernels.md). float32 tiles hold twice the bytes of bfloat16 ones and
# multiply on the CUDA cores, so they are smaller: with heads of 32 a 32-key forward tile or a 64-row dq tile of
# 4 warps spills; with heads of 64 the dq kernel also holds the global keys' [64, 64] tiles and their gradients,
# and only 8 warps over 16-row tiles stay under 255 registers.
_SHIPPED = {
    ("float32", 16): BlockConfig(block_q=32, block_k=16, num_warps=4, num_stages=2),
    ("float32", 32): BlockConfig(block_q=32, block_k=16, num_warps=4, num_stages=2),
    ("float32", 64): BlockConfig(block_q=16, block_k=16, num_warps=8, num_stages=2),
    ("bfloat16", 16): BlockConfig(block_q=64, block_k=32, num_warps=4, num_stages=2),
    ("bfloat16", 32): BlockConfig(block_q=64, block_k=32, num_warps=4, num_stages=2),
    ("bfloat16", 64): BlockConfig(block_q=64, block_k=32, num_warps=4, num_stages=2),
}


def shipped_block_config(dtype, head_dim: int) -> BlockConfig:
    """The tiles `windowed_attention` uses unless given others. Head sizes above 64 (not compile-checked) take
    the smallest tiles."""
    padded = max(16, pl.next_power_of_2(head_dim))
    return _SHIPPED.get((np.dtype(dtype).name, padded), BlockConfig(block_q=16, block_k=16))
