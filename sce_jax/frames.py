"""PyTerrier-style result frames (`qid`, `query`, `docno`, a text column; one row per document) checked and
grouped by query, for `SparseCrossEncoder.rerank` and the PyTerrier transformer."""

from __future__ import annotations

import numpy as np
import pandas as pd


def frame_queries(frame: pd.DataFrame, text_field: str = "text") -> tuple[np.ndarray, list[str]]:
    """(each row's query index, the queries' texts in order of first appearance) of a result frame.

    ValueError, naming the column or qid, for: a missing column; a row without qid or docno (NaN/None); a row
    without query or text; a qid whose rows carry different query texts (they would all be scored against one)."""
    missing = [c for c in ("qid", "query", "docno", text_field) if c not in frame]
    if missing:
        raise ValueError(f"the frame lacks column(s) {', '.join(missing)}")
    for column in ("qid", "docno"):
        absent = np.flatnonzero(frame[column].isna().to_numpy())
        if absent.size:
            raise ValueError(f"column {column!r} is missing (NaN/None) in {absent.size} rows, the first at position "
                             f"{absent[0]}")
    no_text = frame[frame[["query", text_field]].isna().any(axis=1)]
    if len(no_text):
        raise ValueError(f"{len(no_text)} rows without query or {text_field!r}, e.g. qid {no_text.qid.iloc[0]} "
                         f"docno {no_text.docno.iloc[0]}")
    pairs = frame[["qid", "query"]].drop_duplicates()
    repeated = pairs[pairs["qid"].duplicated(keep=False)]
    if len(repeated):
        qid = repeated["qid"].iloc[0]
        texts = repeated.loc[repeated["qid"] == qid, "query"].tolist()
        shown = ", ".join(map(repr, texts[:3])) + (", ..." if len(texts) > 3 else "")
        raise ValueError(f"qid {qid!r} has {len(texts)} different query texts ({shown}): each qid must have one "
                         "query")
    doc_query, _ = pd.factorize(frame["qid"])
    return doc_query, pairs["query"].tolist()
