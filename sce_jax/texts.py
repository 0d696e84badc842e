"""Query and document texts for runs that carry only ids: local files, then an ir_datasets dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from sce_jax import irds
from sce_jax.runs import InputError, json_records, located, open_text

# Text column -> the id column it belongs to, and the word for that id in messages.
TEXT_COLUMNS = {"query": ("qid", "queries"), "text": ("docno", "documents")}


class MissingTextError(InputError):
    """Queries or documents of a run for which no source has a text."""


def read_tsv_texts(path: str | os.PathLike) -> dict[str, str]:
    """`id<TAB>text` lines (`.gz` allowed); further tab-separated fields join the text (e.g. title, body)."""
    texts = {}
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            text_id, tab, text = line.partition("\t")
            if not tab or not text_id:
                raise located(path, line_no, "expected an id, a tab, then the text")
            texts[text_id] = " ".join(text.split("\t"))
    return texts


def read_jsonl_docs(path: str | os.PathLike) -> dict[str, str]:
    """JSON lines or a JSON list of `{"docno" (or "doc_id"): ..., "text": ...}`."""
    texts = {}
    for where, record in json_records(path):
        docno = record.get("docno", record.get("doc_id")) if isinstance(record, dict) else None
        if docno is None or not isinstance(record.get("text"), str):
            raise located(path, where, 'expected an object with "docno" (or "doc_id") and a string "text"')
        texts[str(docno)] = record["text"]
    return texts


def read_docs(path: str | os.PathLike) -> dict[str, str]:
    """Document texts from a TSV (`docno<TAB>text`) or, by its name, a JSON/JSONL file."""
    if any(suffix in (".json", ".jsonl") for suffix in Path(path).suffixes):
        return read_jsonl_docs(path)
    return read_tsv_texts(path)


def _missing(run: pd.DataFrame, column: str) -> pd.Series:
    return run[column].isna() if column in run else pd.Series(True, index=run.index)


def _fill(run: pd.DataFrame, column: str, texts: dict[str, str]) -> pd.DataFrame:
    id_column = TEXT_COLUMNS[column][0]
    missing = _missing(run, column)
    filled = run[id_column].map(texts)
    run = run.copy()
    run[column] = run[column].where(~missing, filled) if column in run else filled
    return run


def complete_texts(run: pd.DataFrame, *, source: str, queries_file: str | os.PathLike | None = None,
                   docs_file: str | os.PathLike | None = None, dataset_id: str | None = None) -> pd.DataFrame:
    """The run with every `query` and `text` filled in: texts the run has stay; missing ones come from
    `queries_file`/`docs_file`, then from the ir_datasets dataset (read only if still needed).

    Raises MissingTextError naming the ids (and `source`, the run's name) that no source has text for.
    """
    local_files = {"query": (queries_file, read_tsv_texts), "text": (docs_file, read_docs)}
    dataset_texts = {"query": irds.dataset_queries, "text": irds.dataset_docs}
    for column, (id_column, noun) in TEXT_COLUMNS.items():
        path, read = local_files[column]
        if path is not None and _missing(run, column).any():
            run = _fill(run, column, read(path))
        if dataset_id is not None and _missing(run, column).any():
            wanted = run.loc[_missing(run, column), id_column].unique()
            run = _fill(run, column, dataset_texts[column](dataset_id, wanted))
        missing_ids = run.loc[_missing(run, column), id_column].unique()
        if len(missing_ids):
            shown = ", ".join(map(str, missing_ids[:5])) + (", ..." if len(missing_ids) > 5 else "")
            raise MissingTextError(f"{source}: no text for {len(missing_ids)} {noun} ({id_column} {shown}); "
                                   "give them in the run, a local file, or an ir_datasets id")
    return run
