"""A request's texts -> the token ids the model scores, in the layout `SparseCrossEncoder.score_window` gives them.

Runs on the server's tokenizer thread, not the batcher's, and tokenizes only what the model can use: a document
is cut at a space after a first guess of characters and tokenized; only if that yields too few wordpieces is a
longer prefix tried (4x as long each time, up to the whole text). So a 4 MB document costs a few kilobytes of
tokenization, and its first wordpieces are exactly those of the whole text. MaxP needs every wordpiece, so it
tokenizes documents whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sce_jax.encoder import maxp_chunk_starts
from sce_jax.serve.checks import ApiError
from sce_jax.tokenization import TextError

# First guess of the characters that hold a wordpiece (English averages ~4-5 with its space).
CHARS_PER_TOKEN = 8


@dataclasses.dataclass
class Prepared:
    """One request, tokenized: its query and the rows to score (one per document, or MaxP's chunks)."""

    query_tokens: list[int]
    rows: list[list[int]]
    num_docs: int
    chunk_doc: np.ndarray | None = None  # MaxP: the document of each row

    def doc_scores(self, row_scores: np.ndarray) -> np.ndarray:
        """Scores per document from scores per row: the best chunk's with MaxP."""
        if self.chunk_doc is None:
            return row_scores
        scores = np.full(self.num_docs, -np.inf, np.float32)
        np.maximum.at(scores, self.chunk_doc, row_scores)
        return scores


def space_cut(text: str, chars: int) -> str:
    """`text` ended before a space (U+0020), at most `chars` characters long where it has a space there (else
    up to its first space after them, or whole): whole words only, so the wordpieces of the cut are the first
    wordpieces of the text."""
    if len(text) <= chars:
        return text
    end = text.rfind(" ", 0, chars + 1)
    if end <= 0:
        end = text.find(" ", chars)
    return text if end < 0 else text[:end]


def leading_wordpieces(tokenizer, docs: Sequence[str], keep: int) -> list[list[int]]:
    """Each document's wordpieces: all of them, or for a longer document at least its first `keep` (as the whole
    text gives them), tokenizing only a prefix of it. A text the tokenizer cannot take is a TextError."""
    pieces: list[list[int] | None] = [None] * len(docs)
    pending, chars = list(range(len(docs))), CHARS_PER_TOKEN * max(keep, 1)
    while pending:
        cuts = [space_cut(docs[i], chars) for i in pending]
        try:
            encoded = tokenizer.encode_docs([()] * len(cuts), cuts, truncate=False)
        except TextError as error:  # name the document, not its place among the cuts
            index = pending[error.index]
            raise TextError(index, f"text {index}: {str(error).split(': ', 1)[-1]}") from None
        retry = []
        for i, cut, ids in zip(pending, cuts, encoded):
            if len(ids) >= keep or len(cut) == len(docs[i]):
                pieces[i] = ids
            else:
                retry.append(i)
        pending, chars = retry, 4 * chars
    return pieces  # type: ignore[return-value]


def prepare(tokenizer, query: str, docs: Sequence[str], *, truncate: bool = True, max_p: bool = False,
            max_tokens: int | None = None, field: str = "texts") -> Prepared:
    """Token rows for `docs` under `query`: each document's first wordpieces (at most `max_tokens`, then what fits
    with the query in max_length), or with `max_p` its chunks. 422 for a text the tokenizer cannot take or a
    query without wordpieces; with `truncate` false, 413 for a document that does not fit."""
    try:
        query_tokens = tokenizer.encode_queries([query])[0]
    except TextError as error:
        raise ApiError(422, f"query: {str(error).split(': ', 1)[-1]}") from None
    if len(query_tokens) <= 2:  # only the two [SEP]s
        raise ApiError(422, "query is empty after the tokenizer's normalisation (no wordpieces)")
    budget = tokenizer.doc_budget(query_tokens)
    cap = budget + 1 if max_tokens is None else min(max_tokens, budget + 1)
    sep = tokenizer.sep_token_id
    try:
        if max_p:
            pieces = [ids[:max_tokens] for ids in tokenizer.encode_docs([()] * len(docs), docs, truncate=False)]
        else:
            pieces = [ids[:cap] for ids in leading_wordpieces(tokenizer, docs, cap)]
    except TextError as error:
        raise ApiError(422, f"{field}[{error.index}]: {str(error).split(': ', 1)[-1]}") from None
    if max_p:
        rows, chunk_doc = [], []
        for doc, ids in enumerate(pieces):
            for start in maxp_chunk_starts(len(ids), budget):
                rows.append(ids[start : start + budget] + [sep, sep])
                chunk_doc.append(doc)
        return Prepared(query_tokens, rows, len(docs), np.array(chunk_doc, np.int64))
    if not truncate:
        too_long = [i for i, ids in enumerate(pieces) if len(ids) > budget]
        if too_long:
            raise ApiError(413, f"documents {too_long[:5]} exceed max_length {tokenizer.max_length} tokens with the "
                           "query (send \"truncate\": true to truncate them)")
    return Prepared(query_tokens, [ids[:budget] + [sep, sep] for ids in pieces], len(docs))
