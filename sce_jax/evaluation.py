"""Effectiveness of runs with ir_measures: TREC qrels files, measure names, results side by side."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence

import ir_measures
import pandas as pd

from sce_jax.errors import InputError, located
from sce_jax.files import atomic_write, read_lines

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


def evaluate(qrels: pd.DataFrame, runs: Mapping[str, pd.DataFrame | Iterable[pd.DataFrame]],
             measures: Sequence) -> dict[str, dict[str, float]]:
    """{measure name: {run name: ir_measures' aggregate}} for runs with `qid`, `docno`, `score` (ir_measures ranks
    by score, ties by docno; a query of the qrels that the run lacks counts with the value of an empty ranking).

    A run may come as an iterable of frames, each holding whole queries (`CompactRun.frames`): they are evaluated
    one at a time and the per-query values aggregated as ir_measures' `calc_aggregate` does (same numbers), so a
    7M-row run (MS MARCO dev at depth 1000) never becomes one frame and one dict of dicts in memory."""
    evaluator = ir_measures.evaluator(measures, qrels)
    judged_queries = set(qrels["query_id"].astype(str))
    depth = needed_depth(measures)
    results = {str(measure): {} for measure in measures}
    for run_name, chunks in runs.items():
        aggregators = {str(measure): measure.aggregator() for measure in measures}
        seen: set[str] = set()
        for run in [chunks] if isinstance(chunks, pd.DataFrame) else chunks:
            queries = set(run["qid"].astype(str))
            run = _prune(run, judged_queries, depth)
            for metric in _per_query(evaluator, run):
                # The evaluator also reports the qrels' queries that are not in this piece (as empty rankings):
                # those are counted once, below, if no piece has them.
                if metric.query_id in queries:
                    aggregators[str(metric.measure)].add(metric.value)
            seen |= queries
        for metric in _per_query(evaluator, pd.DataFrame({"qid": [], "docno": [], "score": []})):
            if metric.query_id not in seen:
                aggregators[str(metric.measure)].add(metric.value)
        for name, aggregator in aggregators.items():
            results[name][run_name] = float(aggregator.result())
    return results


def needed_depth(measures: Sequence) -> int | None:
    """How many top-scored documents per query the measures read: the largest cutoff when every measure has one
    (nDCG@10, RR@10, P@5, R@1000, ...) and none judges only judged documents; None (all) otherwise."""
    cutoffs = []
    for measure in measures:
        cutoff = measure.params.get("cutoff")
        if not isinstance(cutoff, int) or measure.params.get("judged_only"):
            return None
        cutoffs.append(cutoff)
    return max(cutoffs, default=None)


def _prune(run: pd.DataFrame, judged_queries: set[str], depth: int | None) -> pd.DataFrame:
    """The rows that can change a measure: queries with qrels only, and with a `depth`, each query's rows that
    score at least its depth-th highest score (ties at the boundary kept, whatever ir_measures' tie order)."""
    run = run[run["qid"].astype(str).isin(judged_queries)]
    if depth is not None and len(run):
        place = run.groupby("qid", sort=False)["score"].rank(method="min", ascending=False)
        run = run[place.to_numpy() <= depth]
    return run


def _per_query(evaluator, run: pd.DataFrame):
    scored = pd.DataFrame({"query_id": run["qid"].astype(object), "doc_id": run["docno"].astype(object),
                           "score": run["score"].astype(float)})
    return evaluator.iter_calc(scored)


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
