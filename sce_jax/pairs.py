"""Docpair files of any size read into compact numpy arrays, vectorised (no Python object per line).

A pairs file has one pair per line, tab-separated: `qid docid_a docid_b [score_a score_b]` (the local format) or
any other order of those fields (`columns`; ir_datasets' kd-docpairs file is `score_a score_b qid docid_a docid_b`).
Ids are interned: decimal ids (MS MARCO's) are kept as their numbers (int32 when they fit: no table at all),
other ids as indices into a sorted table of their bytes. 40M pairs take ~0.8 GB (three int32 and two float32
columns) and are read in chunks of `CHUNK_BYTES`. Every line is checked (field count, empty ids, UTF-8, finite
scores) before any is used; the first bad one is reported as `file: line N: ...`.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from sce_jax.errors import InputError, located

CHUNK_BYTES = 64 << 20
LOCAL_COLUMNS = ("qid", "doc_a", "doc_b", "score_a", "score_b")
_MAX_DIGITS = 18  # decimal ids of up to 18 digits fit an int64


class IdTable:
    """Maps interned ids (ints) back to their strings."""

    def __init__(self, table: np.ndarray | None):
        self.table = table  # None: the int is the (decimal) id; int64 array: decimal ids; bytes array: ids

    def strings(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        indices = np.asarray(indices)
        if self.table is None:
            return [str(int(i)) for i in indices]
        values = self.table[indices]
        if values.dtype.kind == "S":
            return [v.decode("utf-8") for v in values]
        if values.dtype.kind == "O":  # strings (ids of an ir_datasets iterator)
            return list(values)
        return [str(int(v)) for v in values]

    def __len__(self) -> int:
        return -1 if self.table is None else len(self.table)


class DocPairArrays(NamedTuple):
    """Pairs as arrays: query_P, doc_a_P, doc_b_P (interned ids, int32); scores_Px2 (float32) or None."""

    query_P: np.ndarray
    doc_a_P: np.ndarray
    doc_b_P: np.ndarray
    scores_Px2: np.ndarray | None
    query_ids: IdTable
    doc_ids: IdTable

    def __len__(self) -> int:
        return len(self.query_P)


def line_chunks(path, chunk_bytes: int) -> Iterator[bytes]:
    """The file's bytes in pieces that end at a line end (the last may lack one)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            rest = b""
            while True:
                block = f.read(chunk_bytes)
                if not block:
                    break
                block = rest + block
                cut = block.rfind(b"\n") + 1
                if cut == 0:
                    rest = block
                    continue
                rest = block[cut:]
                yield block[:cut]
            if rest:
                yield rest
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise InputError(f"{path}: cannot read ({error})") from None


def _field_matrix(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Fields buf[starts[i]:ends[i]] as a fixed-width bytes array (NUL-padded on the right)."""
    lengths = ends - starts
    width = max(int(lengths.max(initial=1)), 1)
    matrix = np.zeros((len(starts), width), np.uint8)
    last = len(buf) - 1
    for column in range(width):  # one gather per column: ids are short
        matrix[:, column] = np.where(column < lengths, buf[np.minimum(starts + column, last)], 0)
    return matrix.view(f"S{width}").ravel()


def _decimal(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
    """The fields as int64 if every one is a canonical decimal number (no sign, no leading zero), else None."""
    width = int(lengths.max(initial=0))
    if width > _MAX_DIGITS or not len(starts):
        return None
    first = buf[starts] - np.uint8(48)  # uint8 arithmetic wraps: a non-digit becomes >= 10
    if np.any(first > 9) or np.any((lengths > 1) & (first == 0)):
        return None
    value, last = first.astype(np.int64), len(buf) - 1
    for column in range(1, width):
        inside = column < lengths
        digit = buf[np.minimum(starts + column, last)] - np.uint8(48)
        if np.any(inside & (digit > 9)):
            return None
        np.multiply(value, 10, out=value, where=inside)
        np.add(value, digit, out=value, where=inside)
    return value


def _floats(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The fields as float64: plain decimals (`-12.375`) parsed vectorised, anything else (exponents, inf, ...)
    by Python's parser; NaN marks a field that is no number."""
    lengths = ends - starts
    last = len(buf) - 1
    negative = buf[starts] == ord("-")
    position = starts + negative
    n = len(starts)
    mantissa = np.zeros(n, np.int64)
    decimals = np.zeros(n, np.int64)
    digits = np.zeros(n, np.int64)
    seen_point = np.zeros(n, bool)
    plain = position < ends
    for column in range(int(lengths.max(initial=0))):
        at = position + column
        inside = at < ends
        digit = buf[np.minimum(at, last)] - np.uint8(48)  # wraps: '.' (46) -> 254, non-digits -> >= 10
        is_digit = inside & (digit <= 9)
        is_point = inside & (digit == 254) & ~seen_point
        plain &= ~inside | is_digit | is_point
        np.multiply(mantissa, 10, out=mantissa, where=is_digit)
        np.add(mantissa, digit, out=mantissa, where=is_digit)
        digits += is_digit
        decimals += is_digit & seen_point
        seen_point |= is_point
    plain &= (digits >= 1) & (digits <= 17)  # exact in an int64, close to exact in a float64
    values = mantissa / 10.0 ** decimals
    np.negative(values, out=values, where=negative)
    for row in np.flatnonzero(~plain):
        try:
            values[row] = float(bytes(buf[starts[row]:ends[row]]))
        except ValueError:
            values[row] = np.nan
    return values


class _Chunk(NamedTuple):
    ids: dict  # column -> (bytes array, int64 array or None)
    scores: np.ndarray | None


def _parse_chunk(data: bytes, first_line: int, path, columns: Sequence[str]) -> tuple[_Chunk, int]:
    """One chunk of whole lines; returns the parsed fields and the number of lines in it."""
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == 10)
    if not len(ends) or ends[-1] != len(buf) - 1:
        ends = np.append(ends, len(buf))
    starts = np.concatenate([[0], ends[:-1] + 1])
    num_lines = len(ends)
    line_ends = ends - ((ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13))  # drop a '\r'
    tabs = np.flatnonzero(buf == 9)
    tab_counts = np.bincount(np.searchsorted(ends, tabs), minlength=num_lines)
    blank = line_ends == starts
    expected = len(columns) - 1
    bad = np.flatnonzero(~blank & (tab_counts != expected))
    if len(bad):
        line = int(bad[0])
        raise located(path, first_line + line, f"expected {len(columns)} tab-separated fields "
                      f"({' '.join(columns)}), got {tab_counts[line] + 1}")
    keep = ~blank
    starts, line_ends = starts[keep], line_ends[keep]
    line_numbers = first_line + np.flatnonzero(keep)
    tabs_LxT = tabs.reshape(-1, expected)
    field_starts = np.column_stack([starts, tabs_LxT + 1])
    field_ends = np.column_stack([tabs_LxT, line_ends])
    empty = field_ends - field_starts == 0
    if empty.any():
        row, column = np.argwhere(empty)[0]
        raise located(path, int(line_numbers[row]), f"empty {columns[column]} field")
    non_ascii_lines = np.zeros(len(starts), bool)
    if (buf >= 0x80).any():
        non_ascii = np.flatnonzero(buf >= 0x80)
        non_ascii_lines[np.unique(np.searchsorted(line_ends, non_ascii))] = True
    for row in np.flatnonzero(non_ascii_lines):  # rare: check those lines' UTF-8 one by one
        try:
            bytes(buf[starts[row]:line_ends[row]]).decode("utf-8")
        except UnicodeDecodeError as error:
            raise located(path, int(line_numbers[row]), f"not valid UTF-8 ({error.reason} at byte {error.start})")
    ids, scores = {}, []
    for column, name in enumerate(columns):
        begin, end = field_starts[:, column], field_ends[:, column]
        if name.startswith("score"):
            numbers = _floats(buf, begin, end)
            finite = np.isfinite(numbers)
            if not finite.all():
                row = int(np.flatnonzero(~finite)[0])
                text = bytes(buf[begin[row]:end[row]]).decode("utf-8", "replace")
                raise located(path, int(line_numbers[row]), f"{name} must be a finite number, got {text!r}")
            scores.append(numbers.astype(np.float32))
        else:
            numbers = _decimal(buf, begin, end - begin)
            ids[name] = (numbers if numbers is not None else _field_matrix(buf, begin, end), numbers)
    return _Chunk(ids, np.column_stack(scores) if scores else None), num_lines


def _intern(parts: list[tuple[np.ndarray, np.ndarray | None]], sizes: list[int]) -> tuple[list[np.ndarray], IdTable]:
    """Interned int32 ids for several columns (each a list of per-chunk (bytes, int64 or None)) sharing a table."""
    if all(numbers is not None for _, numbers in parts):
        values = np.concatenate([numbers for _, numbers in parts]) if parts else np.zeros(0, np.int64)
        if not len(values) or values.max() < 2**31:
            interned, table = values.astype(np.int32), IdTable(None)
        else:
            unique, inverse = np.unique(values, return_inverse=True)
            interned, table = inverse.astype(np.int32), IdTable(unique)
    else:
        parts = [(numbers.astype("S18") if numbers is not None else b, None) for b, numbers in parts]
        width = max(b.dtype.itemsize for b, _ in parts)
        unique, inverse = np.unique(np.concatenate([b.astype(f"S{width}") for b, _ in parts]), return_inverse=True)
        interned, table = inverse.astype(np.int32), IdTable(unique)
    return np.split(interned, np.cumsum(sizes)[:-1]), table


def read_docpairs(path: str | os.PathLike, columns: Sequence[str] = LOCAL_COLUMNS, *,
                  chunk_bytes: int = CHUNK_BYTES) -> DocPairArrays:
    """Read a pairs file (`.gz` allowed). `columns` names each tab-separated field: qid, doc_a, doc_b and
    optionally score_a, score_b. For the local format (the default) the two scores are optional as a pair:
    the file's first line decides whether lines have 3 or 5 fields."""
    chunks, line = [], 1
    for data in line_chunks(path, chunk_bytes):
        if not chunks and tuple(columns) == LOCAL_COLUMNS:
            first = data.lstrip(b"\r\n").split(b"\n", 1)[0]
            columns = LOCAL_COLUMNS[:3] if first.count(b"\t") == 2 else LOCAL_COLUMNS
        chunk, num_lines = _parse_chunk(data, line, path, columns)
        chunks.append(chunk)
        line += num_lines
    if not chunks or not sum(len(c.ids["qid"][0]) for c in chunks):
        raise InputError(f"{path}: contains no pairs")
    sizes = [len(c.ids["qid"][0]) for c in chunks]
    (query_P,), query_ids = _intern([c.ids["qid"] for c in chunks], [sum(sizes)])
    docs, doc_ids = _intern([c.ids["doc_a"] for c in chunks] + [c.ids["doc_b"] for c in chunks], [sum(sizes)] * 2)
    scores = np.concatenate([c.scores for c in chunks]) if chunks[0].scores is not None else None
    return DocPairArrays(query_P, docs[0], docs[1], scores, query_ids, doc_ids)
