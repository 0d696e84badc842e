"""Sparse Cross-Encoders (Schlatt, Fröbe, Hagen, ECIR 2024) for re-ranking, in JAX/Flax."""

from sce_jax.config import SparseCrossEncoderConfig
from sce_jax.encoder import SparseCrossEncoder

__all__ = ["SparseCrossEncoder", "SparseCrossEncoderConfig"]
__version__ = "0.1.0"
