"""Docpair files of any size read into compact numpy arrays, vectorised (no Python object per line).

A pairs file has one pair per line, tab-separated: `qid docid_a docid_b [score_a score_b]` (the local format) or
any other order of those fields (`columns`; ir_datasets' kd-docpairs file is `score_a score_b qid docid_a docid_b`).
Ids are interned: decimal ids (MS MARCO's) are kept as their numbers (int32 when they fit: no table at all),
other ids as indices into a sorted table of their bytes. 40M pairs take ~0.8 GB (three int32 and two float32
columns) and are read in chunks of `CHUNK_BYTES`. Every line is checked (field count, empty ids, UTF-8, finite
scores) before any is used; the first bad one is reported as `file: line N: ...`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sce_jax.cache import cache_dir
from sce_jax.errors import InputError, located

CHUNK_BYTES = 16 << 20
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


def release_free_memory() -> None:
    """Hand memory that was freed back to the OS (glibc keeps freed heap and per-thread arena memory, which after
    the chunked parse is several times the arrays kept). Best effort: a no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    ids: dict  # column -> (bytes array or None, numbers (int32 below 2^31, else int64) or None)
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
            if numbers is not None and numbers.max(initial=0) < 2**31:
                numbers = numbers.astype(np.int32)  # 4 bytes per id from the start
            ids[name] = (_field_matrix(buf, begin, end) if numbers is None else None, numbers)
    return _Chunk(ids, np.column_stack(scores) if scores else None), num_lines


def _intern(columns: list[list[tuple]]) -> tuple[list[np.ndarray], IdTable]:
    """Interned int32 ids of several columns sharing one table; each column a list of per-chunk parts
    (bytes array or None, numbers or None), emptied as it is consumed (memory: one column at a time)."""
    parts = [part for column in columns for part in column]
    if all(numbers is not None and numbers.dtype == np.int32 for _, numbers in parts):
        out = []
        for column in columns:  # decimal ids below 2^31 are their own interned value: no table
            out.append(np.concatenate([numbers for _, numbers in column]))
            column.clear()
        return out, IdTable(None)
    sizes = [sum(len(b if numbers is None else numbers) for b, numbers in column) for column in columns]
    if all(numbers is not None for _, numbers in parts):
        unique, inverse = np.unique(np.concatenate([n.astype(np.int64) for _, n in parts]), return_inverse=True)
    else:
        keys = [numbers.astype("S18") if numbers is not None else b for b, numbers in parts]
        width = max(k.dtype.itemsize for k in keys)
        unique, inverse = np.unique(np.concatenate([k.astype(f"S{width}") for k in keys]), return_inverse=True)
    for column in columns:
        column.clear()
    return np.split(inverse.astype(np.int32), np.cumsum(sizes)[:-1]), IdTable(unique)


CACHE_VERSION = 1


def load_docpairs(path: str | os.PathLike, columns: Sequence[str] = LOCAL_COLUMNS) -> DocPairArrays:
    """`read_docpairs`, cached: the arrays are saved once under `$SCE_JAX_CACHE_DIR/docpairs/` (keyed by the
    file's absolute path and the columns, checked against its size and modification time) and later memory-mapped,
    so a restart or `--resume` costs about a second and the arrays are file-backed pages. Best effort: a cache that
    cannot be written is skipped."""

    path = Path(path).absolute()
    stat = path.stat()
    key = hashlib.sha1(f"{path}\0{','.join(columns)}".encode("utf-8", "surrogateescape")).hexdigest()
    directory = cache_dir() / "docpairs" / key
    stamp = {"version": CACHE_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        if json.loads((directory / "stamp.json").read_text()) == stamp:
            arrays = {f.stem: np.load(f, mmap_mode="r") for f in directory.glob("*.npy")}
            return DocPairArrays(arrays["query_P"], arrays["doc_a_P"], arrays["doc_b_P"], arrays.get("scores_Px2"),
                                 IdTable(arrays.get("query_table")), IdTable(arrays.get("doc_table")))
    except (OSError, ValueError, KeyError):
        pass
    pairs = read_docpairs(path, columns)
    staging = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{key}."))
        named = {"query_P": pairs.query_P, "doc_a_P": pairs.doc_a_P, "doc_b_P": pairs.doc_b_P,
                 "scores_Px2": pairs.scores_Px2, "query_table": pairs.query_ids.table,
                 "doc_table": pairs.doc_ids.table}
        for name, array in named.items():
            if array is not None and array.dtype != object:
                np.save(staging / f"{name}.npy", array)
        if pairs.query_ids.table is None or pairs.query_ids.table.dtype != object:
            (staging / "stamp.json").write_text(json.dumps(stamp))
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(staging, directory)
    except OSError:  # e.g. another process put its copy in place first
        pass
    if staging is not None and staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
    return pairs


def read_docpairs(path: str | os.PathLike, columns: Sequence[str] = LOCAL_COLUMNS, *,
                  chunk_bytes: int = CHUNK_BYTES) -> DocPairArrays:
    """Read a pairs file (`.gz` allowed). `columns` names each tab-separated field: qid, doc_a, doc_b and
    optionally score_a, score_b. For the local format (the default) the two scores are optional as a pair:
    the file's first line decides whether lines have 3 or 5 fields."""
    parts: dict[str, list] = {"qid": [], "doc_a": [], "doc_b": []}
    scores: list[np.ndarray] = []
    line, count = 1, 0
    pending: collections.deque = collections.deque()
    workers = max(1, min(4, os.cpu_count() or 1))

    def collect(future) -> None:
        nonlocal count
        chunk = future.result()
        for name in parts:
            parts[name].append(chunk.ids[name])
        if chunk.scores is not None:
            scores.append(chunk.scores)
        count += len(chunk.ids["qid"][1] if chunk.ids["qid"][1] is not None else chunk.ids["qid"][0])

    # Chunks are parsed in threads (numpy releases the GIL), a few at a time so memory stays bounded.
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="read-docpairs") as pool:
        for data in line_chunks(path, chunk_bytes):
            if line == 1 and tuple(columns) == LOCAL_COLUMNS:
                first = data.lstrip(b"\r\n").split(b"\n", 1)[0]
                columns = LOCAL_COLUMNS[:3] if first.count(b"\t") == 2 else LOCAL_COLUMNS
            pending.append(pool.submit(lambda d, first_line: _parse_chunk(d, first_line, path, columns)[0],
                                       data, line))
            line += data.count(b"\n") + (not data.endswith(b"\n"))
            while len(pending) > workers:
                collect(pending.popleft())
        while pending:
            collect(pending.popleft())
    if not count:
        raise InputError(f"{path}: contains no pairs")
    (query_P,), query_ids = _intern([parts["qid"]])
    (doc_a_P, doc_b_P), doc_ids = _intern([parts["doc_a"], parts["doc_b"]])
    scores_Px2 = np.concatenate(scores) if scores else None
    scores.clear()
    release_free_memory()
    return DocPairArrays(query_P, doc_a_P, doc_b_P, scores_Px2, query_ids, doc_ids)
