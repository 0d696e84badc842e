"""The model's typed input and how token lists are padded into it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Batch(NamedTuple):
    """Listwise model input (see docs/architecture.md).

    query_ids:   [Q, Lq] query wordpieces + [SEP] [SEP], 0-padded.
    doc_ids:     [D, Ld] rows of document wordpieces + [SEP] [SEP], 0-padded; an all-padding row is a padding row.
    doc_query:   [D] index of each row's query.
    doc_lengths: [D, C] lengths of the C documents packed back to back in each row (0: empty slot), all of the
                 row's query; None means one document per row (C = 1). Scores come out per slot, [D·C].
    """

    query_ids: np.ndarray
    doc_ids: np.ndarray
    doc_query: np.ndarray
    doc_lengths: np.ndarray | None = None


def make_batch(
    query_tokens: Sequence[Sequence[int]],
    doc_tokens: Sequence[Sequence[int]],
    doc_query: Sequence[int],
    *,
    query_length: int,
    doc_length: int,
    num_queries: int | None = None,
    num_docs: int | None = None,
    pad_id: int = 0,
) -> Batch:
    """Pad token lists to fixed shapes; extra slots are padding queries/documents."""
    num_queries = len(query_tokens) if num_queries is None else num_queries
    num_docs = len(doc_tokens) if num_docs is None else num_docs
    if len(query_tokens) > num_queries or len(doc_tokens) > num_docs:
        raise ValueError(
            f"{len(query_tokens)} queries / {len(doc_tokens)} documents do not fit {num_queries} / {num_docs} slots"
        )
    if len(doc_query) != len(doc_tokens):
        raise ValueError(f"doc_query has {len(doc_query)} entries for {len(doc_tokens)} documents")
    query_ids = np.full((num_queries, query_length), pad_id, np.int32)
    doc_ids = np.full((num_docs, doc_length), pad_id, np.int32)
    doc_query_arr = np.zeros((num_docs,), np.int32)
    for i, tokens in enumerate(query_tokens):
        if len(tokens) > query_length:
            raise ValueError(f"query {i} has {len(tokens)} tokens, more than query_length={query_length}")
        query_ids[i, : len(tokens)] = tokens
    for i, tokens in enumerate(doc_tokens):
        if len(tokens) > doc_length:
            raise ValueError(f"document {i} has {len(tokens)} tokens, more than doc_length={doc_length}")
        doc_ids[i, : len(tokens)] = tokens
    doc_query_arr[: len(doc_query)] = doc_query
    return Batch(query_ids, doc_ids, doc_query_arr)


def pack_rows(
    query_tokens: Sequence[Sequence[int]],
    rows: Sequence[Sequence[Sequence[int]]],
    row_query: Sequence[int],
    *,
    query_length: int,
    row_length: int,
    slots: int,
    num_queries: int | None = None,
    num_rows: int | None = None,
    pad_id: int = 0,
) -> Batch:
    """A packed batch: row i holds the documents `rows[i]` (token lists, all of query `row_query[i]`) back to back."""
    num_rows = len(rows) if num_rows is None else num_rows
    if len(rows) > num_rows or any(len(docs) > slots for docs in rows):
        raise ValueError(f"{len(rows)} rows / {max(map(len, rows), default=0)} documents per row do not fit "
                         f"{num_rows} / {slots} slots")
    batch = make_batch(query_tokens, [[t for doc in docs for t in doc] for docs in rows], row_query,
                       query_length=query_length, doc_length=row_length, num_queries=num_queries, num_docs=num_rows,
                       pad_id=pad_id)
    doc_lengths = np.zeros((num_rows, slots), np.int32)
    for i, docs in enumerate(rows):
        doc_lengths[i, : len(docs)] = [len(doc) for doc in docs]
    return batch._replace(doc_lengths=doc_lengths)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket that holds `length` (buckets ascending)."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def length_buckets(max_length: int, *, step: int = 32, growth: float = 1.25) -> tuple[int, ...]:
    """A small ascending set of padded lengths up to `max_length`.

    Multiples of `step` that grow geometrically, so padding waste stays under ~25% while the number of
    distinct shapes (and XLA compilations) grows only logarithmically with max_length.
    """
    buckets = []
    length = step
    while length < max_length:
        buckets.append(length)
        length = max(length + step, int(np.ceil(length * growth / step)) * step)
    buckets.append(max_length)
    return tuple(buckets)
