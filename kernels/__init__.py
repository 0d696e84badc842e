"""Pallas GPU kernel for the sparse cross-encoder's document-row attention (see docs/kernels.md)."""

from kernels.block_config import BlockConfig
from kernels.windowed_attention import windowed_attention

__all__ = ["BlockConfig", "windowed_attention"]
