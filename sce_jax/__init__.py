"""Sparse Cross-Encoders (Schlatt, Fröbe, Hagen, ECIR 2024) for re-ranking, in JAX/Flax."""

import logging as _logging
import os as _os


class _NoTorchAdvisory(_logging.Filter):
    """transformers advises on import that PyTorch was not found; sce_jax needs torch only for `.bin` checkpoints
    (and says so when it does). Only that advisory is dropped: the filter sits on transformers' own logger, so it
    must be in place before transformers is imported."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found.")


_logging.getLogger("transformers").addFilter(_NoTorchAdvisory())

# The kernels live in the repository's top-level kernels/ folder and install as sce_jax.kernels
# (pyproject.toml's package-dir). Run from a source checkout, sce_jax.kernels is found in that folder.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "cpu_attention.cc")
):
    __path__.append(_root)

from sce_jax.errors import guard_startup as _guard_startup

_guard_startup()  # Ctrl-C while a command imports jax: one line, exit 130 (sce_jax.errors)

from sce_jax.cache import enable_compilation_cache  # noqa: E402
from sce_jax.config import SparseCrossEncoderConfig  # noqa: E402
from sce_jax.encoder import SparseCrossEncoder  # noqa: E402

__all__ = ["SparseCrossEncoder", "SparseCrossEncoderConfig", "enable_compilation_cache"]
__version__ = "0.1.0"
