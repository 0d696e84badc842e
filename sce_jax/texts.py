"""Query and document texts for runs that carry only ids: local files, then an ir_datasets dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from sce_jax import irds
from sce_jax.errors import MissingTextError, located
from sce_jax.files import read_lines
from sce_jax.runs import CompactRun, json_records
from sce_jax.textstore import TextStore

# Text column -> the id column it belongs to, and the word for that id in messages.
TEXT_COLUMNS = {"query": ("qid", "queries"), "text": ("docno", "documents")}


def read_tsv_texts(path: str | os.PathLike) -> dict[str, str]:
    """`id<TAB>text` lines (`.gz` allowed); further tab-separated fields join the text (e.g. title, body).

    Reads the whole file into memory: for large collections use `TextStore` (sce_jax.textstore)."""
    texts = {}
    first_line = {}
    for line_no, line in read_lines(path):
        if not line.strip():
            continue
        text_id, tab, text = line.partition("\t")
        if not tab or not text_id:
            raise located(path, line_no, "expected an id, a tab, then the text")
        text = " ".join(text.split("\t"))
        if texts.setdefault(text_id, text) != text:
            raise located(path, line_no, f"a second, different text for id {text_id!r} (first at line "
                          f"{first_line[text_id]})")
        first_line.setdefault(text_id, line_no)
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
    `queries_file`/`docs_file` (only the ids needed are read, see TextStore), then from the ir_datasets dataset
    (read only if still needed).

    Raises MissingTextError naming the ids (and `source`, the run's name) that no source has text for.
    """
    local_files = {"query": queries_file, "text": docs_file}
    dataset_texts = {"query": irds.dataset_queries, "text": irds.dataset_docs}
    for column, (id_column, noun) in TEXT_COLUMNS.items():
        path = local_files[column]
        if path is not None and _missing(run, column).any():
            wanted = list(run.loc[_missing(run, column), id_column].unique())
            with TextStore.open(path, kind=noun) as store:
                found = {i: t for i, t in zip(wanted, store.lookup(wanted)) if t is not None}
            run = _fill(run, column, found)
        if dataset_id is not None and _missing(run, column).any():
            wanted = run.loc[_missing(run, column), id_column].unique()
            run = _fill(run, column, dataset_texts[column](dataset_id, wanted))
        missing_ids = run.loc[_missing(run, column), id_column].unique()
        if len(missing_ids):
            raise _missing_error(source, noun, id_column, missing_ids)
    return run


def _missing_error(source, noun: str, id_column: str, missing_ids) -> MissingTextError:
    shown = ", ".join(map(str, missing_ids[:5])) + (", ..." if len(missing_ids) > 5 else "")
    return MissingTextError(f"{source}: no text for {len(missing_ids)} {noun} ({id_column} {shown}); "
                            "give them in the run, a local file, or an ir_datasets id")


class RunTexts:
    """Texts for a `CompactRun`, looked up window by window: texts the run carries, then the local files (through
    a TextStore: only the lines needed are read), then the ir_datasets dataset (its docs store).

    Checked when made, before any work: every query has a text, and every document has one in the run or the
    local file's index (or there is a dataset to ask). Query texts (thousands) are held; document texts are not.
    """

    def __init__(self, run: CompactRun, *, source: str, queries_file=None, docs_file=None,
                 dataset_id: str | None = None):

        self.run = run
        self.source = source
        self.dataset_id = dataset_id
        self._docs_lookup = None
        queries = list(run.query_texts) if run.query_texts is not None else [None] * len(run.qids)
        if queries_file is not None and None in queries:
            wanted = [q for q, t in zip(run.qids, queries) if t is None]
            with TextStore.open(queries_file, kind="queries") as store:
                found = dict(zip(wanted, store.lookup(wanted)))
            queries = [t if t is not None else found.get(q) for q, t in zip(run.qids, queries)]
        if dataset_id is not None and None in queries:
            found = irds.dataset_queries(dataset_id, [q for q, t in zip(run.qids, queries) if t is None])
            queries = [t if t is not None else found.get(q) for q, t in zip(run.qids, queries)]
        missing = [q for q, t in zip(run.qids, queries) if t is None]
        if missing:
            raise _missing_error(source, "queries", "qid", missing)
        self.queries: list[str] = queries

        needs = np.ones(len(run), bool) if run.doc_texts is None else np.array([t is None for t in run.doc_texts])
        self.store = None
        if docs_file is not None and needs.any():
            self.store = TextStore.open(docs_file, kind="documents")
            absent = np.zeros(len(run), bool)
            absent[needs] = self.store.absent(run.docno[needs])
            if absent.any() and dataset_id is None:
                missing = list(dict.fromkeys(d.decode() for d in run.docno[absent][:1000].tolist()))
                raise _missing_error(source, "documents", "docno", missing + ["..."] * (int(absent.sum()) > 1000))
        elif needs.any() and dataset_id is None:
            missing = list(dict.fromkeys(d.decode() for d in run.docno[needs][:1000].tolist()))
            raise _missing_error(source, "documents", "docno", missing)
        if dataset_id is not None and needs.any():
            self._docs_lookup = irds.docs_lookup(dataset_id)

    def docs(self, start: int, stop: int) -> list[str]:
        """The texts of rows start..stop; MissingTextError if one has none anywhere."""
        docnos = self.run.docnos(start, stop)
        texts = list(self.run.doc_texts[start:stop]) if self.run.doc_texts is not None else [None] * len(docnos)
        need = [i for i, t in enumerate(texts) if t is None]
        if need and self.store is not None:
            for i, text in zip(need, self.store.lookup([docnos[i] for i in need])):
                texts[i] = text
            need = [i for i in need if texts[i] is None]
        if need and self._docs_lookup is not None:
            found = self._docs_lookup([docnos[i] for i in need])
            for i in need:
                texts[i] = found.get(docnos[i])
            need = [i for i in need if texts[i] is None]
        if need:
            raise _missing_error(self.source, "documents", "docno", list(dict.fromkeys(docnos[i] for i in need)))
        return texts

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
