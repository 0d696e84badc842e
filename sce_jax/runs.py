"""Run files: the TREC run format (read and write), the original's JSON/JSONL format, depth cut, ranking.

A run is a pandas DataFrame with one row per (query, document) and PyTerrier's column names: `qid`, `docno`
(strings), `rank`, `score` (float64, NaN where the input had none), and optionally `query` and `text`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from sce_jax.errors import InputError, located
from sce_jax.files import BOM, atomic_write, check_text, gzip_errors, open_binary, read_lines
from sce_jax.idhash import hash_fixed

logger = logging.getLogger(__name__)

# The TREC run line, shared by reader and writer. A 5-column line lacks the tag.
RUN_COLUMNS = ("qid", "q0", "docno", "rank", "score", "tag")

# The original's JSON field names, and the ir_datasets names accepted in their place.
JSON_FIELD_ALIASES = {"qid": ("qid", "query_id"), "docno": ("docno", "doc_id")}
JSON_TEXT_FIELDS = ("query", "text")


def _number(value, kind: type, path, where, field: str) -> float:
    """A rank (kind int: integers only, so TREC `3.5` and JSON `1.7` are errors) or a score (kind float)."""
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError
        return float(kind(value))
    except (TypeError, ValueError, OverflowError):
        noun = "an integer" if kind is int else "a number"
        raise located(path, where, f"{field} {value!r} is not {noun}") from None


def read_trec_run(path: str | os.PathLike) -> pd.DataFrame:
    """Read a TREC run (`qid Q0 docno rank score [tag]`, whitespace-separated; `.gz` allowed)."""
    qids, docnos, ranks, scores = [], [], [], []
    for line_no, line in read_lines(path):
        fields = line.split()
        if not fields:
            continue
        qid, docno, rank, score = _trec_fields(fields, path, line_no)
        qids.append(qid)
        docnos.append(docno)
        ranks.append(rank)
        scores.append(score)
    return _run_frame(qids, docnos, ranks, scores)


def _trec_fields(fields: list, path, line_no: int) -> tuple:
    if len(fields) not in (len(RUN_COLUMNS) - 1, len(RUN_COLUMNS)):
        raise located(path, line_no, f"expected 5 or 6 whitespace-separated columns ({' '.join(RUN_COLUMNS)}), "
                      f"got {len(fields)}")
    return (fields[0], fields[2], _number(fields[3], int, path, line_no, "rank"),
            _number(fields[4], float, path, line_no, "score"))


def json_records(path, digest=None) -> Iterator[tuple[str | int, object]]:
    """(where, record) for a JSON list, a single JSON object, or JSON lines (BOM stripped, `.gz` allowed).
    `digest` (a hashlib object), if given, is updated with the file's (decompressed) bytes."""
    with open_binary(path) as f, gzip_errors(path):
        data = f.read()
    if digest is not None:
        digest.update(data)
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise located(path, line, f"not UTF-8 (byte {data[error.start]:#04x})") from None
    del data
    if content.startswith(BOM):
        content = content[1:]
    try:
        whole = json.loads(content)
    except json.JSONDecodeError as error:
        if content.lstrip().startswith("["):
            raise located(path, error.lineno, f"malformed JSON: {error.msg}") from None
        whole = None
    if isinstance(whole, list):
        yield from ((f"item {i}", record) for i, record in enumerate(whole))
        return
    if whole is not None:
        yield 1, whole
        return
    for line_no, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as error:
            raise located(path, line_no, f"malformed JSON: {error.msg}") from None


def json_id(value, path, where, name: str) -> str:
    """An id from JSON: a string, or an integer (written in decimal); floats, booleans, lists, objects are errors."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise located(path, where, f"{name} must be a string (or an integer), got {json.dumps(value)}")
    if not value or any(c.isspace() for c in value):  # it could not be written to a TREC run
        raise located(path, where, f"{name} {value!r} must be non-empty and contain no whitespace")
    return check_text(value, path, where, name)


def _json_field(record: dict, names: tuple[str, ...], path, where) -> str:
    for name in names:
        if record.get(name) is not None:
            return json_id(record[name], path, where, name)
    raise located(path, where, f"missing field {' or '.join(map(repr, names))}")


def _json_number(record: dict, field: str, kind: type, path, where) -> float:
    value = record.get(field)
    if value is None:
        return np.nan
    return _number(value, kind, path, where, field)


def read_json_run(path: str | os.PathLike, digest=None) -> pd.DataFrame:
    """Read the original's JSON run format: a JSON list or JSON lines (`.gz` allowed) of records with
    `qid` (or `query_id`), `docno` (or `doc_id`), and optionally `query`, `text`, `rank`, `score`.

    Ids are strings, or integers (taken as their decimal text); ranks are integers. `digest`: see `json_records`."""
    columns = {name: [] for name in ("qid", "docno", "rank", "score", *JSON_TEXT_FIELDS)}
    for where, record in json_records(path, digest):
        if not isinstance(record, dict):
            raise located(path, where, f"expected a JSON object, got {type(record).__name__}")
        for field, names in JSON_FIELD_ALIASES.items():
            columns[field].append(_json_field(record, names, path, where))
        columns["rank"].append(_json_number(record, "rank", int, path, where))
        columns["score"].append(_json_number(record, "score", float, path, where))
        for field in JSON_TEXT_FIELDS:
            value = record.get(field)
            if value is not None and not isinstance(value, str):
                raise located(path, where, f"{field} must be a string, got {type(value).__name__}")
            columns[field].append(value if value is None else check_text(value, path, where, field))
    run = _run_frame(columns["qid"], columns["docno"], columns["rank"], columns["score"])
    for field in JSON_TEXT_FIELDS:
        if any(value is not None for value in columns[field]):
            run[field] = pd.Series(columns[field], dtype=object)
    return run


def is_json_run(path: str | os.PathLike) -> bool:
    """Whether a file name says JSON (`.json`, `.jsonl`, optionally `.gz`) rather than a TREC run."""
    suffixes = Path(path).suffixes
    return bool(suffixes) and (suffixes[-1] in (".json", ".jsonl") or suffixes[-2:] in ([".json", ".gz"],
                                                                                         [".jsonl", ".gz"]))


def _run_frame(qids, docnos, ranks, scores) -> pd.DataFrame:
    return pd.DataFrame({
        "qid": pd.Series(qids, dtype=object),
        "docno": pd.Series(docnos, dtype=object),
        "rank": np.asarray(ranks, dtype=np.float64),
        "score": np.asarray(scores, dtype=np.float64),
    })


def _query_order(run: pd.DataFrame) -> np.ndarray:
    """Each row's query's position in the order queries first appear."""
    return pd.factorize(run["qid"])[0]


def select_top(run: pd.DataFrame, depth: int | None) -> pd.DataFrame:
    """The first `depth` documents of each query (all if `depth` is None), in first-stage order.

    First-stage order is: input rank ascending, then input score descending (so missing ranks fall back to
    the score), then file order; missing values sort last. A repeated (qid, docno) pair keeps its first
    occurrence in that order; the others are dropped with a warning. Queries keep the order they first appear in.
    """
    order = np.lexsort((
        np.arange(len(run)),
        np.nan_to_num(-run["score"].to_numpy(), nan=np.inf),
        np.nan_to_num(run["rank"].to_numpy(), nan=np.inf),
        _query_order(run),
    ))
    run = run.iloc[order]
    repeated = run.duplicated(["qid", "docno"])
    if repeated.any():
        examples = ", ".join(f"({q}, {d})" for q, d in run.loc[repeated, ["qid", "docno"]].head(3).itertuples(
            index=False))
        logger.warning("dropped %d repeated (qid, docno) pairs, e.g. %s", int(repeated.sum()), examples)
        run = run.loc[~repeated.to_numpy()]
    if depth is not None:
        run = run[run.groupby("qid", sort=False).cumcount().to_numpy() < depth]
    return run.reset_index(drop=True)


def rank_by_score(run: pd.DataFrame, *, first_rank: int) -> pd.DataFrame:
    """The run sorted by descending `score` within each query, `rank` numbered from `first_rank`.

    Equal scores keep the order they have in `run` (for re-ranked runs: the first-stage order), so the
    ranking is deterministic. Queries keep the order they first appear in.
    """
    order = np.lexsort((np.arange(len(run)), -run["score"].to_numpy(), _query_order(run)))
    ranked = run.iloc[order].reset_index(drop=True)
    ranked["rank"] = ranked.groupby("qid", sort=False).cumcount().to_numpy() + first_rank
    return ranked


def format_score(score: float) -> str:
    """The shortest decimal that reads back as the same float32."""
    return str(np.float32(score))


def write_trec_run(path: str | os.PathLike, run: pd.DataFrame, tag: str) -> None:
    """Write `run` (with `qid`, `docno`, `score`) as a TREC run ranked by descending score (see
    `rank_by_score`), atomically: an existing file is replaced only once the new one is complete."""
    if any(c.isspace() for c in tag) or not tag:
        raise InputError(f"run tag {tag!r} must be a non-empty word without whitespace")
    ranked = rank_by_score(run, first_rank=1)
    with atomic_write(path) as f:
        for qid, docno, rank, score in zip(ranked["qid"], ranked["docno"], ranked["rank"], ranked["score"]):
            row = {"qid": qid, "q0": "Q0", "docno": docno, "rank": rank, "score": format_score(score), "tag": tag}
            f.write(" ".join(str(row[column]) for column in RUN_COLUMNS) + "\n")


# --- compact runs: millions of lines, cut to depth while reading, held in arrays ------------------------------


class CompactRun(NamedTuple):
    """A depth-cut run in arrays, rows grouped by query (queries in order of first appearance), each query's rows
    in first-stage order (see `select_top`).

    qids: the queries' ids; query: each row's query (index into qids, ascending); docno: bytes ids (`S` array);
    rank/score: the input's (NaN where missing); query_texts / doc_texts: texts the input carried, else None.
    """

    qids: list[str]
    query: np.ndarray
    docno: np.ndarray
    rank: np.ndarray
    score: np.ndarray
    query_texts: list[str | None] | None = None
    doc_texts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.query)

    def query_bounds(self) -> np.ndarray:
        """Row offsets where each query starts, and the end: len(qids) + 1 entries."""
        return np.searchsorted(self.query, np.arange(len(self.qids) + 1), "left")

    def docnos(self, start: int, stop: int) -> list[str]:
        return [d.decode("utf-8") for d in self.docno[start:stop].tolist()]

    def frame(self, *, scores: np.ndarray | None = None, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Rows start:stop (default all) as a run frame (qid, docno, rank, score): for evaluation and small runs."""
        stop = len(self) if stop is None else stop
        qids = np.asarray(self.qids, object)[self.query[start:stop]]
        scores = self.score if scores is None else scores
        return pd.DataFrame({"qid": qids, "docno": pd.Series(self.docnos(start, stop), dtype=object),
                             "rank": self.rank[start:stop], "score": scores[start:stop]})

    def frames(self, *, scores: np.ndarray | None = None, rows: int = 1 << 20) -> Iterator[pd.DataFrame]:
        """`frame` in pieces of whole queries, each about `rows` rows (one query's rows are never split)."""
        bounds = self.query_bounds()
        first = 0
        while first < len(self.qids):
            end = max(first + 1, int(np.searchsorted(bounds, bounds[first] + rows, "right")) - 1)
            end = min(end, len(self.qids))
            yield self.frame(scores=scores, start=int(bounds[first]), stop=int(bounds[end]))
            first = end


class DepthCut:
    """Rows added in file order, kept to the first `depth` distinct documents per query in first-stage order
    (rank ascending, score descending, file order; a repeated (qid, docno) keeps its first), pruned as they come
    so memory follows what is kept, not the input's length."""

    def __init__(self, depth: int | None, *, chunk_rows: int = 1 << 20):
        self.depth = depth
        self.chunk_rows = chunk_rows
        self.codes: dict[str, int] = {}
        self.rows_read = 0
        self.repeats = 0
        self.examples: list[tuple[int, bytes]] = []
        self._lists = ([], [], [], [])  # query code, docno bytes, rank, score
        self._pending: list[tuple] = []
        self._pending_rows = 0
        self._kept: tuple | None = None

    def add(self, qid: str, docno: str, rank: float, score: float) -> None:
        code = self.codes.get(qid)
        if code is None:
            code = self.codes[qid] = len(self.codes)
        q, d, r, s = self._lists
        q.append(code)
        d.append(docno.encode("utf-8"))
        r.append(rank)
        s.append(score)
        if len(q) >= self.chunk_rows:
            self._to_arrays()

    def add_arrays(self, qids: np.ndarray, docnos: np.ndarray, ranks: np.ndarray, scores: np.ndarray) -> None:
        """Rows in file order, as arrays (qids: str objects; docnos: `S` bytes), after the rows
        added before."""
        self._to_arrays()
        inverse, uniques = pd.factorize(qids)
        codes = np.empty(len(uniques), np.int32)
        for i, qid in enumerate(uniques.tolist()):
            code = self.codes.get(qid)
            if code is None:
                code = self.codes[qid] = len(self.codes)
            codes[i] = code
        n = len(qids)
        line = np.arange(self.rows_read, self.rows_read + n, dtype=np.int64)
        self._pending.append((codes[inverse], docnos, np.asarray(ranks, np.float64), np.asarray(scores, np.float64),
                              line))
        self.rows_read += n
        self._pending_rows += n
        kept = 0 if self._kept is None else len(self._kept[0])
        if self._pending_rows >= max(self.chunk_rows, kept):
            self._prune()

    def _to_arrays(self) -> None:
        q, d, r, s = self._lists
        if not q:
            return
        n = len(q)
        line = np.arange(self.rows_read, self.rows_read + n, dtype=np.int64)
        self._pending.append((np.asarray(q, np.int32), np.asarray(d, dtype=bytes), np.asarray(r, np.float64),
                              np.asarray(s, np.float64), line))
        self.rows_read += n
        self._pending_rows += n
        self._lists = ([], [], [], [])
        kept = 0 if self._kept is None else len(self._kept[0])
        if self._pending_rows >= max(self.chunk_rows, kept):  # prune: total work stays linear
            self._prune()

    def _prune(self) -> None:
        parts = ([self._kept] if self._kept is not None else []) + self._pending  # file order
        if not parts:
            return
        q, d, r, s, line = (np.concatenate([p[i] for p in parts]) for i in range(5))
        self._pending, self._pending_rows = [], 0
        rank_key, score_key = np.nan_to_num(r, nan=np.inf), np.nan_to_num(-s, nan=np.inf)
        if not _in_first_stage_order(q, rank_key, score_key, line):  # runs usually are: no sort then
            order = np.lexsort((line, score_key, rank_key, q))
            q, d, r, s, line = q[order], d[order], r[order], s[order], line[order]
        # Repeated (qid, docno): keep the first in this order. Grouped by one 64-bit key (the docno's hash mixed
        # with the query), then compared exactly, so a hash collision is no repeat.
        key = hash_fixed(d) ^ (q.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        by_key = np.argsort(key, kind="stable")  # equal keys stay in first-stage order
        adjacent = np.flatnonzero(key[by_key][1:] == key[by_key][:-1])
        first, later = by_key[adjacent], by_key[adjacent + 1]
        exact = (q[first] == q[later]) & (d[first] == d[later])
        repeated = np.zeros(len(q), bool)
        repeated[later[exact]] = True
        for colliding in np.unique(key[later[~exact]]).tolist():  # practically never: resolve exactly
            seen = set()
            for i in np.flatnonzero(key == colliding).tolist():
                repeated[i] = (int(q[i]), bytes(d[i])) in seen
                seen.add((int(q[i]), bytes(d[i])))
        self.repeats += int(repeated.sum())
        for i in np.flatnonzero(repeated)[: max(0, 3 - len(self.examples))].tolist():
            self.examples.append((int(q[i]), bytes(d[i])))
        keep = ~repeated
        if self.depth is not None:
            starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
            kept_rows = np.cumsum(keep)  # the depth counts kept (non-repeated) rows
            before = np.repeat(kept_rows[starts] - keep[starts], np.diff(np.r_[starts, len(q)]))
            keep &= kept_rows - before <= self.depth
        if not keep.all():
            q, d, r, s, line = q[keep], d[keep], r[keep], s[keep], line[keep]
        self._kept = (q, d, r, s, line)

    def finish(self) -> CompactRun:
        self._to_arrays()
        self._prune()
        qids = list(self.codes)
        if self.repeats:
            examples = ", ".join(f"({qids[q]}, {d.decode()})" for q, d in self.examples)
            logger.warning("dropped %d repeated (qid, docno) pairs, e.g. %s", self.repeats, examples)
        if self._kept is None:
            return CompactRun(qids, np.zeros(0, np.int32), np.zeros(0, "S1"), np.zeros(0), np.zeros(0))
        q, d, r, s, _ = self._kept
        # Queries whose every row was cut cannot happen (depth >= 1); codes are dense in first-appearance order.
        return CompactRun(qids, q, d, r, s)


def _blocks(path, size: int = 16 << 20) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, block of whole lines) of a file's bytes (`.gz` allowed), BOM stripped."""
    line_no, carry = 1, b""
    with open_binary(path) as f, gzip_errors(path):
        first = True
        while True:
            data = f.read(size)
            if first and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            first = False
            if not data:
                if carry:
                    yield line_no, carry
                return
            data = carry + data
            cut = data.rfind(b"\n") + 1
            block, carry = data[:cut], data[cut:]
            if block:
                yield line_no, block
                line_no += block.count(b"\n")


def _parse_trec_block(block: bytes) -> pd.DataFrame | None:
    """The block's rows by pandas' C parser, or None where it cannot be trusted (then the line parser decides):
    a wrong column count, a rank that is not an integer, a score that is not a number (or NaN)."""
    try:
        frame = pd.read_csv(io.BytesIO(block), sep=r"\s+", header=None, names=list(RUN_COLUMNS), engine="c",
                            dtype={"qid": str, "q0": str, "docno": str, "rank": np.int64,
                                   "score": np.float64, "tag": str},
                            na_filter=False, quoting=3, skip_blank_lines=True)
    except (ValueError, TypeError, OverflowError, pd.errors.ParserError):
        return None
    if frame["score"].isna().any():
        return None
    return frame


def _in_first_stage_order(q, rank_key, score_key, line) -> bool:
    """Whether rows are already sorted by (query, rank, -score, file order)."""
    if len(q) < 2:
        return True
    same_q = q[1:] == q[:-1]
    r0, r1, s0, s1 = rank_key[:-1], rank_key[1:], score_key[:-1], score_key[1:]
    within = (r1 > r0) | ((r1 == r0) & ((s1 > s0) | ((s1 == s0) & (line[1:] > line[:-1]))))
    return bool(((q[1:] > q[:-1]) | (same_q & within)).all())


def read_trec_run_compact(path: str | os.PathLike, depth: int | None, digest=None) -> CompactRun:
    """A TREC run (`.gz` allowed) read in blocks into a `CompactRun`, cut to `depth` as it is read.

    Blocks go through pandas' C parser; a block it cannot parse cleanly is read line by line, which names the
    file and line of the first bad line (or accepts what the C parser is strict about). `digest` (a hashlib
    object), if given, is updated with the file's bytes (after a BOM) as they are read: a content fingerprint at no
    extra pass."""
    cut = DepthCut(depth)
    for first_line, block in _blocks(path):
        if digest is not None:
            digest.update(block)
        try:
            block.decode("utf-8")
        except UnicodeDecodeError as error:
            line_no = first_line + block.count(b"\n", 0, error.start)
            raise located(path, line_no, f"not UTF-8 (byte {block[error.start]:#04x})") from None
        frame = _parse_trec_block(block)
        if frame is not None:
            docnos = frame["docno"].to_numpy(object)
            try:
                docnos = docnos.astype(bytes)
            except UnicodeEncodeError:
                docnos = np.asarray([d.encode("utf-8") for d in docnos], dtype=bytes)
            cut.add_arrays(frame["qid"].to_numpy(object), docnos, frame["rank"].to_numpy(np.float64), frame["score"].to_numpy())
            continue
        for offset, raw in enumerate(block.splitlines()):
            fields = raw.decode("utf-8").split()
            if fields:
                cut.add(*_trec_fields(fields, path, first_line + offset))
    return cut.finish()


def compact_from_frame(run: pd.DataFrame, depth: int | None) -> CompactRun:
    """A run frame (e.g. a JSON run, which may carry texts) as a depth-cut `CompactRun`."""
    run = select_top(run, depth)
    codes, qids = pd.factorize(run["qid"])
    query_texts = doc_texts = None
    if "query" in run:
        first = run.drop_duplicates("qid")
        query_texts = [None if pd.isna(t) else t for t in first["query"].tolist()]
    if "text" in run:
        doc_texts = np.asarray(run["text"].tolist(), dtype=object)
    return CompactRun(list(qids), codes.astype(np.int32), np.asarray([d.encode("utf-8") for d in run["docno"]],
                      dtype=bytes), run["rank"].to_numpy(np.float64), run["score"].to_numpy(np.float64),
                      query_texts, doc_texts)
