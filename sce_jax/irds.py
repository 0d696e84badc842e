"""ir_datasets access for re-ranking: datasets by id or by run-file name, their runs, texts and qrels."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import ir_datasets
import pandas as pd

from sce_jax.errors import InputError


class UnknownDatasetError(InputError):
    """An id that ir_datasets does not know."""


def is_dataset_id(text: str) -> bool:
    return text in set(ir_datasets.registry)


def load_dataset(dataset_id: str) -> ir_datasets.Dataset:
    try:
        return ir_datasets.load(dataset_id)
    except KeyError:
        raise UnknownDatasetError(f"unknown ir_datasets id {dataset_id!r}") from None


def infer_dataset_id(path: str | os.PathLike) -> str | None:
    """The dataset a run file is named after, as in the original: the file name without its suffixes and
    without `__...__` markers, with each '/' of the id written as '-' (`msmarco-passage-trec-dl-2019-judged.run`
    is `msmarco-passage/trec-dl-2019/judged`). None if no registered id matches."""
    name = Path(path).name
    stem = re.sub(r"__.+__", "", name[: len(name) - len("".join(Path(name).suffixes))])
    dashed = {dataset_id.replace("/", "-"): dataset_id for dataset_id in ir_datasets.registry}
    return dashed.get(stem)


@contextlib.contextmanager
def _reading(dataset_id: str, what: str) -> Iterator[ir_datasets.Dataset]:
    """The dataset, checked to have `what` (docs, queries, qrels, scoreddocs); download failures become
    InputErrors."""
    dataset = load_dataset(dataset_id)
    if not getattr(dataset, f"has_{what}")():
        raise InputError(f"ir_datasets dataset {dataset_id!r} has no {what}")
    try:
        yield dataset
    except (OSError, RuntimeError) as error:  # ir_datasets raises RuntimeError when every download source fails
        reason = error.args[0] if error.args else type(error).__name__
        raise InputError(f"could not read the {what} of ir_datasets dataset {dataset_id!r}: {reason}") from error


def dataset_run(dataset_id: str) -> pd.DataFrame:
    """The dataset's scoreddocs as a run (no ranks: they follow the scores)."""
    with _reading(dataset_id, "scoreddocs") as dataset:
        rows = [(sd.query_id, sd.doc_id, sd.score) for sd in dataset.scoreddocs_iter()]
    run = pd.DataFrame(rows, columns=["qid", "docno", "score"]).astype({"qid": object, "docno": object})
    run.insert(2, "rank", float("nan"))
    return run.astype({"score": "float64"})


def dataset_run_compact(dataset_id: str, depth: int | None):
    """The dataset's scoreddocs as a CompactRun, cut to `depth` while read (no ranks: they follow the scores)."""
    from sce_jax.runs import DepthCut

    cut = DepthCut(depth)
    with _reading(dataset_id, "scoreddocs") as dataset:
        for sd in dataset.scoreddocs_iter():
            cut.add(sd.query_id, sd.doc_id, float("nan"), float(sd.score))
    return cut.finish()


def dataset_queries(dataset_id: str, qids: Iterable[str]) -> dict[str, str]:
    wanted = set(qids)
    with _reading(dataset_id, "queries") as dataset:
        return {q.query_id: q.default_text() for q in dataset.queries_iter() if q.query_id in wanted}


def dataset_docs(dataset_id: str, docnos: Iterable[str]) -> dict[str, str]:
    with _reading(dataset_id, "docs") as dataset:
        docs = dataset.docs_store().get_many(list(docnos))
        return {docno: doc.default_text() for docno, doc in docs.items()}


def docs_lookup(dataset_id: str):
    """A function docnos -> {docno: text} over the dataset's docs store (opened once)."""
    with _reading(dataset_id, "docs") as dataset:
        store = dataset.docs_store()

    def lookup(docnos: list[str]) -> dict[str, str]:
        with _reading(dataset_id, "docs"):
            return {docno: doc.default_text() for docno, doc in store.get_many(list(docnos)).items()}

    return lookup


def dataset_qrels(dataset_id: str) -> pd.DataFrame:
    """Qrels in ir_measures' column names (`query_id`, `doc_id`, `relevance`)."""
    with _reading(dataset_id, "qrels") as dataset:
        rows = [(qrel.query_id, qrel.doc_id, int(qrel.relevance)) for qrel in dataset.qrels_iter()]
    return pd.DataFrame(rows, columns=["query_id", "doc_id", "relevance"])


def has_qrels(dataset_id: str) -> bool:
    return load_dataset(dataset_id).has_qrels()
