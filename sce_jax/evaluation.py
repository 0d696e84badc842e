"""Effectiveness of runs with ir_measures: TREC qrels files, measure names, results side by side."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import ir_measures
import pandas as pd

from sce_jax.runs import InputError, atomic_write, located, read_lines

DEFAULT_MEASURES = ("nDCG@10", "RR@10")


def parse_measures(names: Sequence[str]) -> list:
    """ir_measures measures from their names (`nDCG@10`, `RR@10`, `AP`, ...)."""
    measures = []
    for name in names:
        try:
            measures.append(ir_measures.parse_measure(name))
        except (ValueError, NameError, SyntaxError):
            raise InputError(f"unknown ir_measures measure {name!r}") from None
    return measures


def read_qrels(path: str | os.PathLike) -> pd.DataFrame:
    """A TREC qrels file (`qid iteration docno relevance`), in ir_measures' column names."""
    rows = []
    for line_no, line in read_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise located(path, line_no, f"expected 4 columns (qid iteration docno relevance), got {len(fields)}")
        try:
            relevance = int(fields[3])
        except ValueError:
            raise located(path, line_no, f"relevance {fields[3]!r} is not an integer") from None
        rows.append((fields[0], fields[2], relevance))
    return pd.DataFrame(rows, columns=["query_id", "doc_id", "relevance"])


def evaluate(qrels: pd.DataFrame, runs: Mapping[str, pd.DataFrame], measures: Sequence) -> dict[str, dict[str, float]]:
    """{measure name: {run name: mean over the run's queries that have qrels}} for runs with `qid`, `docno`,
    `score` (ir_measures ranks by score, ties by docno)."""
    results = {str(measure): {} for measure in measures}
    for run_name, run in runs.items():
        scored = pd.DataFrame({"query_id": run["qid"], "doc_id": run["docno"], "score": run["score"]})
        for measure, value in ir_measures.calc_aggregate(measures, qrels, scored).items():
            results[str(measure)][run_name] = float(value)
    return results


def format_results(results: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table: one row per measure, one column per run."""
    run_names = list(next(iter(results.values()), {}))
    width = max(len(name) for name in results) if results else 0
    lines = [" " * width + "".join(f"  {name:>10}" for name in run_names)]
    for measure, values in results.items():
        lines.append(f"{measure:<{width}}" + "".join(f"  {values.get(name, float('nan')):>10.4f}" for name in run_names))
    return "\n".join(lines)


def write_results(path: str | os.PathLike, results: Mapping[str, Mapping[str, float]]) -> None:
    with atomic_write(path) as f:
        json.dump(results, f, indent=2)
        f.write("\n")
