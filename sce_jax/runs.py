"""Run files: the TREC run format (read and write), the original's JSON/JSONL format, depth cut, ranking.

A run is a pandas DataFrame with one row per (query, document) and PyTerrier's column names: `qid`, `docno`
(strings), `rank`, `score` (float64, NaN where the input had none), and optionally `query` and `text`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from sce_jax.errors import InputError, located, user_path  # noqa: F401  (re-exported: older imports)

logger = logging.getLogger(__name__)

# The TREC run line, shared by reader and writer. A 5-column line lacks the tag.
RUN_COLUMNS = ("qid", "q0", "docno", "rank", "score", "tag")

# The original's JSON field names, and the ir_datasets names accepted in their place.
JSON_FIELD_ALIASES = {"qid": ("qid", "query_id"), "docno": ("docno", "doc_id")}
JSON_TEXT_FIELDS = ("query", "text")


GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
BOM = "\ufeff"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_text(path: str | os.PathLike) -> IO[str]:
    """Open a UTF-8 text file for reading, gunzipping `.gz` files. (Use `read_lines` for line-located errors.)"""
    path = user_path(path) if not isinstance(path, Path) else path
    check_readable(path)
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def check_readable(path: str | os.PathLike, what: str = "file") -> None:
    """An InputError unless `path` is an existing, readable file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a {what}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable")


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """The file's bytes (gunzipped for `.gz`); see `gzip_errors` for turning read errors into InputErrors."""
    check_readable(path)
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


@contextlib.contextmanager
def gzip_errors(path) -> Iterator[None]:
    """Corrupt, truncated or not-gzip `.gz` input becomes one InputError naming the file."""
    try:
        yield
    except GZIP_ERRORS as error:
        raise InputError(f"{path}: not a valid gzip file (corrupt or truncated): {error}") from None


def decode_line(raw: bytes, path, line_no: int) -> str:
    """One line's bytes as text; non-UTF-8 bytes are an InputError naming file and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise located(path, line_no, f"not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})") from None


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending) of a UTF-8 text file (`.gz` allowed), a leading BOM stripped.

    Missing files, bad gzip data and non-UTF-8 bytes are InputErrors naming the file (and line)."""
    with open_binary(path) as f, gzip_errors(path):
        for line_no, raw in enumerate(f, start=1):
            line = decode_line(raw, path, line_no).rstrip("\r\n")
            if line_no == 1 and line.startswith(BOM):
                line = line[1:]
            yield line_no, line


def check_text(value: str, path, where, field: str) -> str:
    """`value`, if it can be encoded as UTF-8 (JSON escapes can make lone surrogates, which the tokenizer rejects)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise located(path, where, f"{field} contains a lone surrogate (an invalid \\u escape)") from None
    return value


def _write_through(path: Path) -> Path:
    """Where writing `path` should go: a symlink's target (so the link is kept), otherwise `path` itself."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Write a file all at once: into a temporary file beside it, renamed over `path` only on success.

    mode "w" (UTF-8 text, `\\n` line ends) or "wb". A name ending in `.gz` is written gzip-compressed (with a
    zero timestamp, so equal contents give equal bytes). A symlink is written through: its target is replaced,
    the link kept. The file gets the usual mode for new files (0666 less the umask). A failure (an exception
    inside the block) removes the temporary file and leaves any existing `path` as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    target = _write_through(path)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as raw:
            stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if path.name.endswith(".gz") else raw
            with contextlib.ExitStack() as stack:
                if stream is not raw:
                    stack.enter_context(stream)
                if mode == "w":
                    text = io.TextIOWrapper(stream, encoding="utf-8", newline="\n", write_through=False)
                    yield text
                    text.flush()
                    text.detach()
                else:
                    yield stream
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _number(value: str, kind: type, path, where, field: str) -> float:
    try:
        return float(kind(value))
    except (TypeError, ValueError):
        raise located(path, where, f"{field} {value!r} is not {'an integer' if kind is int else 'a number'}") from None


def read_trec_run(path: str | os.PathLike) -> pd.DataFrame:
    """Read a TREC run (`qid Q0 docno rank score [tag]`, whitespace-separated; `.gz` allowed)."""
    qids, docnos, ranks, scores = [], [], [], []
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) not in (len(RUN_COLUMNS) - 1, len(RUN_COLUMNS)):
                raise located(
                    path, line_no, f"expected 5 or 6 whitespace-separated columns ({' '.join(RUN_COLUMNS)}), "
                    f"got {len(fields)}")
            row = dict(zip(RUN_COLUMNS, fields))
            qids.append(row["qid"])
            docnos.append(row["docno"])
            ranks.append(_number(row["rank"], int, path, line_no, "rank"))
            scores.append(_number(row["score"], float, path, line_no, "score"))
    return _run_frame(qids, docnos, ranks, scores)


def json_records(path) -> Iterator[tuple[str | int, object]]:
    """(where, record) for a JSON list, a single JSON object, or JSON lines."""
    with open_text(path) as f:
        content = f.read()
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


def _json_field(record: dict, names: tuple[str, ...], path, where) -> str:
    for name in names:
        if record.get(name) is not None:
            value = str(record[name])
            if not value or any(c.isspace() for c in value):  # it could not be written to a TREC run
                raise located(path, where, f"{name} {value!r} must be non-empty and contain no whitespace")
            return value
    raise located(path, where, f"missing field {' or '.join(map(repr, names))}")


def _json_number(record: dict, field: str, kind: type, path, where) -> float:
    value = record.get(field)
    if value is None:
        return np.nan
    if isinstance(value, bool):  # json true/false would pass int()/float()
        raise located(path, where, f"{field} {value!r} is not a number")
    return _number(value, kind, path, where, field)


def read_json_run(path: str | os.PathLike) -> pd.DataFrame:
    """Read the original's JSON run format: a JSON list or JSON lines (`.gz` allowed) of records with
    `qid` (or `query_id`), `docno` (or `doc_id`), and optionally `query`, `text`, `rank`, `score`."""
    columns = {name: [] for name in ("qid", "docno", "rank", "score", *JSON_TEXT_FIELDS)}
    for where, record in json_records(path):
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
            columns[field].append(value)
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
