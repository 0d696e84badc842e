"""Pallas GPU kernel for the sparse cross-encoder's document-row attention (see docs/kernels.md)."""

from .block_config import BlockConfig
from .windowed_attention import windowed_attention

__all__ = ["BlockConfig", "windowed_attention"]
