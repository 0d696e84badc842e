"""Handing freed memory back to the OS, for the data paths that build large arrays once (pairs, text indexes)."""

from __future__ import annotations

import numpy as np


def release_free_memory() -> None:
    """Hand memory that was freed back to the OS (glibc keeps freed heap and per-thread arena memory, which after
    the chunked parse is several times the arrays kept). Best effort: a no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


_TRIM_BYTES = 128 << 20


def join_freeing(parts: list[np.ndarray]) -> np.ndarray:
    """`np.concatenate(parts)` that empties `parts` as it copies them, handing the freed memory back every
    `_TRIM_BYTES`: the peak is the parts plus one trim interval, not the parts plus the whole result."""
    if not parts:
        raise ValueError("nothing to join")
    out = np.empty((sum(len(part) for part in parts), *parts[0].shape[1:]), parts[0].dtype)
    parts.reverse()  # pop() from the end: the first part first
    at = freed = 0
    while parts:
        part = parts.pop()
        out[at : at + len(part)] = part
        at += len(part)
        freed += part.nbytes
        del part
        if freed >= _TRIM_BYTES:
            release_free_memory()
            freed = 0
    return out
