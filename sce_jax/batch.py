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


# --- planning: documents -> rows -> batches -> steps (pure functions; SparseCrossEncoder executes them) -------

# Documents per row when short documents are packed together: enough to fill rows with passages (~4 per row of
# 304 tokens) while the [CLS] slots, computed whether filled or not, stay a small part of a row.
PACKED_SLOTS = 8
# Rows of packed documents are at least this long (then rounded up to a length bucket).
PACKED_ROW_LENGTH = 256


class Row(NamedTuple):
    length: int  # padded row length
    query: int
    docs: list[int]  # document indices, in row order


def power_of_two_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def pack_documents(
    lengths: np.ndarray, doc_query: np.ndarray, buckets: Sequence[int], *, max_slots: int
) -> list[Row]:
    """Rows of documents, sorted by (length, query).

    With `max_slots` 1, each document has its own row, padded to its length bucket. Otherwise each query's
    documents, longest first, go into the first of its rows with room and a free slot (first-fit decreasing);
    the query's rows are as long as the bucket of its longest document, and at least `PACKED_ROW_LENGTH`.
    Linear in the documents (one sort groups them by query), times the query's open rows per document.
    """
    lengths = np.asarray(lengths, np.int64)
    doc_query = np.asarray(doc_query, np.int64)
    if max_slots == 1:
        rows = [Row(bucket_length(n, buckets), q, [i])
                for i, (n, q) in enumerate(zip(lengths.tolist(), doc_query.tolist()))]
        return sorted(rows, key=lambda row: (row.length, row.query))
    if not len(lengths):
        return []
    # Queries in order of first appearance; within a query, longest first, then input order.
    _, first, appearance = np.unique(doc_query, return_index=True, return_inverse=True)
    query_rank = np.argsort(np.argsort(first, kind="stable"), kind="stable")[appearance.reshape(-1)]
    order = np.lexsort((np.arange(len(lengths)), -lengths, query_rank))
    bounds = np.flatnonzero(np.diff(query_rank[order])) + 1
    rows = []
    min_row = min(PACKED_ROW_LENGTH, buckets[-1])
    for docs in np.split(order, bounds):
        query = int(doc_query[docs[0]])
        doc_lengths = lengths[docs].tolist()
        length = bucket_length(max(doc_lengths[0], min_row), buckets)
        shortest = doc_lengths[-1]
        members: list[list[int]] = []
        free: list[int] = []
        open_rows: list[int] = []  # rows that can still take a document, in creation order
        for doc, n in zip(docs.tolist(), doc_lengths):
            target = next((r for r in open_rows if free[r] >= n), None)
            if target is None:
                target = len(free)
                free.append(length)
                members.append([])
                open_rows.append(target)
            free[target] -= n
            members[target].append(doc)
            if len(members[target]) >= max_slots or free[target] < shortest:  # closed for good
                open_rows.remove(target)
        rows += [Row(length, query, m) for m in members]
    return sorted(rows, key=lambda row: (row.length, row.query))


def plan_batches(rows: Sequence[Row], *, batch_size: int, max_tokens_per_batch: int) -> list[tuple[list[Row], int]]:
    """Rows (sorted by length) -> batches of (rows, row slots): about `batch_size` documents, a power of two of rows
    (fewer for long rows, so a batch holds at most `max_tokens_per_batch` tokens; for the last batch of a length,
    the smallest power of two that holds its rows)."""
    row_lengths = np.array([row.length for row in rows])
    counts: dict[int, list[int]] = {}
    for row in rows:
        counts.setdefault(row.length, []).append(len(row.docs))
    docs_per_row = {length: float(np.mean(c)) for length, c in counts.items()}
    batches = []
    start = 0
    while start < len(rows):
        length = rows[start].length
        left = int(np.searchsorted(row_lengths, length, side="right")) - start
        full = min(power_of_two_at_most(batch_size / docs_per_row[length]),
                   power_of_two_at_most(max_tokens_per_batch // length))
        # The last batch of a length gets the fewest (power-of-two) rows that hold its rows, so rare lengths
        # do not pad to a full batch: a few more shapes, much less wasted compute.
        size = min(full, power_of_two_at_least(left))
        batches.append((list(rows[start : start + min(size, left)]), size))
        start += min(size, left)
    return batches


def plan_slots(batches: Sequence[tuple[list[Row], int]]) -> tuple[dict[int, int], dict[int, int]]:
    """Document slots per row and query slots, one count per row length (so a batch's shapes do not depend on its
    neighbours): powers of two."""
    slots, query_slots = {}, {}
    for batch, _ in batches:
        length = batch[0].length
        slots[length] = max(slots.get(length, 1), power_of_two_at_least(max(len(row.docs) for row in batch)))
        needed = power_of_two_at_least(len({row.query for row in batch}))
        query_slots[length] = max(query_slots.get(length, 1), needed)
    return slots, query_slots


def plan_steps(batches: Sequence[tuple[list[Row], int]], num_devices: int) -> list[tuple[list[list[Row]], int, int]]:
    """Batches -> steps of (batches, row length, row slots): up to `num_devices` batches of one shape per step, so
    each device scores whole batches exactly as a single device would."""
    steps = []
    for batch, size in batches:
        shape = (batch[0].length, size)
        if steps and len(steps[-1][0]) < num_devices and steps[-1][1:] == shape:
            steps[-1][0].append(batch)
        else:
            steps.append(([batch], *shape))
    return steps
