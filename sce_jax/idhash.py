"""64-bit FNV-1a hashes of ids (bytes), vectorised with numpy: the keys of `TextStore`'s index and of the depth
cut's repeat check (`sce_jax.runs.DepthCut`)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


def hash_ids(ids: Iterable[bytes]) -> np.ndarray:
    """64-bit FNV-1a of each id's bytes (uint64), vectorised over the ids."""
    ids = list(ids)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return hash_spans(np.frombuffer(b"".join(ids), np.uint8), np.concatenate([[0], np.cumsum(lengths)[:-1]]),
                       lengths)


def hash_fixed(ids: np.ndarray) -> np.ndarray:
    """`hash_ids` of a fixed-width bytes array (numpy `S` dtype, ids without NUL bytes), without Python objects."""
    ids = np.ascontiguousarray(ids)
    width = ids.dtype.itemsize
    hashes = np.empty(len(ids), np.uint64)
    for start in range(0, len(ids), 1 << 20):
        block = ids[start : start + (1 << 20)].view(np.uint8).reshape(-1, width)
        lengths = (block != 0).sum(axis=1)
        h = np.full(len(block), FNV_OFFSET, np.uint64)
        for column in range(width):
            live = lengths > column
            h = np.where(live, (h ^ block[:, column].astype(np.uint64)) * FNV_PRIME, h)
        hashes[start : start + len(block)] = h
    return hashes


def hash_spans(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """FNV-1a of buffer[starts[i] : starts[i] + lengths[i]] for every i."""
    hashes = np.full(len(starts), FNV_OFFSET, np.uint64)
    for column in range(int(lengths.max(initial=0))):
        live = np.flatnonzero(lengths > column)
        byte = buffer[starts[live] + column].astype(np.uint64)
        hashes[live] = (hashes[live] ^ byte) * FNV_PRIME
    return hashes
