"""Where sce_jax caches what it builds once: text-store indexes, docpair arrays, JSONL indexes."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SCE_JAX_CACHE_DIR"


def cache_dir() -> Path:
    """`$SCE_JAX_CACHE_DIR`, default `$XDG_CACHE_HOME/sce_jax` (`~/.cache/sce_jax`); `~` expanded, absolute."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(os.path.expanduser(configured)).absolute()
    return Path(os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "~/.cache")).absolute() / "sce_jax"
