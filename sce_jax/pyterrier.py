"""A PyTerrier re-ranker: `bm25 >> pt.text.get_text(dataset, "text") >> SparseCrossEncoderReRanker(model)`.

Requires PyTerrier (`pip install 'sce-jax[pyterrier]'`); the Transformer API needs no Java.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

try:
    import pyterrier as pt
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(f"sce_jax.pyterrier needs PyTerrier: pip install 'sce-jax[pyterrier]' ({error})") from error

from sce_jax.encoder import SparseCrossEncoder, check_batch_size
from sce_jax.frames import frame_queries


class SparseCrossEncoderReRanker(pt.Transformer):
    """Scores each (query, document) row of a result frame with a sparse cross-encoder.

    Input: a result frame with `qid`, `query`, `docno` and the text column (`text_field`). Output: the same rows
    and columns with `score` (float32 logits; a `score` or `rank` already there is replaced) and `rank` (from
    PyTerrier's own `add_ranks`: 0 for the best document of each query, equal scores in input order), sorted by
    query (in order of first appearance) and rank. `max_p`: score over-long documents by their best
    50%-overlapping chunk instead of truncating them. `load_kwargs` go to `SparseCrossEncoder.load` when
    `model_or_path` is a path or hub id.
    """

    def __init__(
        self,
        model_or_path: SparseCrossEncoder | str | Path,
        *,
        text_field: str = "text",
        batch_size: int = 32,
        verbose: bool = False,
        max_p: bool = False,
        **load_kwargs: Any,
    ):
        if isinstance(model_or_path, SparseCrossEncoder):
            if load_kwargs:
                raise ValueError(f"{', '.join(load_kwargs)}: loading options given with an already loaded model")
            self.encoder = model_or_path
        else:
            self.encoder = SparseCrossEncoder.load(model_or_path, **load_kwargs)
        check_batch_size(batch_size)
        self.text_field = text_field
        self.batch_size = batch_size
        self.verbose = verbose
        self.max_p = max_p

    def __repr__(self) -> str:
        return f"SparseCrossEncoderReRanker({self.encoder.source!r}, text_field={self.text_field!r})"

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        pt.validate.result_frame(inp, extra_columns=["query", self.text_field], context=self)
        doc_query, queries = frame_queries(inp, self.text_field)
        out = inp.drop(columns=["score", "rank"], errors="ignore").reset_index(drop=True)
        if out.empty:
            return out.assign(score=pd.Series(dtype="float32"), rank=pd.Series(dtype="int64"))
        out["score"] = self.encoder.score_pairs(queries, out[self.text_field].tolist(), doc_query,
                                                batch_size=self.batch_size, max_p=self.max_p,
                                                progress=self.verbose)
        out = pt.model.add_ranks(out)
        return out.iloc[np.lexsort((out["rank"].to_numpy(), doc_query))].reset_index(drop=True)
