"""Tile sizes of the document-row attention kernel, and the one place that picks the Pallas GPU backend."""

import dataclasses

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
