"""Docpair files of any size read into compact numpy arrays, vectorised (no Python object per line).

A pairs file has one pair per line, tab-separated: `qid docid_a docid_b [score_a score_b]` (the local format) or
any other order of those fields (`columns`; ir_datasets' kd-docpairs file is `score_a score_b qid docid_a docid_b`).
Ids are interned: decimal ids (MS MARCO's) are kept as their numbers (int32 when they fit: no table at all),
other ids as indices into a sorted table of their bytes. 40M pairs take ~0.8 GB (three int32 and two float32
columns) and are read in chunks of `CHUNK_BYTES`. `load_docpairs` writes the decimal-id and score columns into its
cache files chunk by chunk and memory-maps them, so they never sit in memory. Every line is checked (field count,
empty ids, UTF-8, finite scores) before any is used; the first bad one is reported as `file: line N: ...`.
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
from sce_jax.files import content_fingerprint
from sce_jax.memory import join_freeing, release_free_memory

CHUNK_BYTES = 16 << 20
LOCAL_COLUMNS = ("qid", "doc_a", "doc_b", "score_a", "score_b")
_MAX_DIGITS = 18  # decimal ids of up to 18 digits fit an int64
UTF8_BOM = b"\xef\xbb\xbf"


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
    """Interned int32 ids of several columns sharing one table (ids that are not all decimal int32: those need
    none, see `_read_docpairs`); each column a list of per-chunk parts (bytes array or None, numbers or None),
    emptied as it is consumed."""
    parts = [part for column in columns for part in column]
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


class _CacheWriteError(Exception):
    """Writing a column into the cache failed (disk full, ...): the caller reads into memory instead."""


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    """A .npy (version 1.0) header of a fixed 128 bytes, so it can be rewritten once the row count is known."""
    header = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                   "shape": tuple(shape)})
    return b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little") + (header.ljust(117) + "\n").encode("latin1")


class _Columns:
    """Where `_read_docpairs` puts the fixed-dtype columns (decimal int32 ids, float32 scores) chunk by chunk:
    in memory (parts joined at the end), or, for the cache, straight into `.npy` files in `directory` (nothing of
    them stays in memory; `take` memory-maps the file)."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory
        self.parts: dict[str, list[np.ndarray]] = {}
        self.files: dict[str, list] = {}  # name -> [file, dtype, row shape, rows]

    def append(self, name: str, array: np.ndarray) -> None:
        if self.directory is None:
            self.parts.setdefault(name, []).append(array)
            return
        if not len(array):  # a chunk of blank lines only
            return
        try:
            if name not in self.files:
                f = open(self.directory / f"{name}.npy", "wb")
                self.files[name] = [f, array.dtype, array.shape[1:], 0]
                f.write(_npy_header(array.dtype, (0, *array.shape[1:])))
            entry = self.files[name]
            entry[0].write(memoryview(np.ascontiguousarray(array)).cast("B"))
            entry[3] += len(array)
        except OSError as error:
            raise _CacheWriteError(error) from None

    def take(self, name: str) -> np.ndarray | None:
        """The column's whole array (None if nothing was appended); the column is forgotten."""
        if self.directory is None:
            parts = self.parts.pop(name, None)
            return None if parts is None else join_freeing(parts)
        entry = self.files.pop(name, None)
        if entry is None:
            return None
        f, dtype, row_shape, rows = entry
        try:
            with f:
                f.seek(0)
                f.write(_npy_header(dtype, (rows, *row_shape)))
            return np.load(self.directory / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as error:
            raise _CacheWriteError(error) from None

    def close(self) -> None:
        for f, *_ in self.files.values():
            f.close()
        self.files.clear()
        self.parts.clear()


_ID_GROUPS = {"query": ("qid",), "doc": ("doc_a", "doc_b")}  # the columns that share one id table
_SAVED = {"qid": "query_P", "doc_a": "doc_a_P", "doc_b": "doc_b_P"}  # names of the arrays (and cache files)


def _cached(directory: Path, stamp: dict) -> DocPairArrays | None:
    """The cached arrays in `directory` (memory-mapped) if its stamp matches, else None."""
    try:
        if json.loads((directory / "stamp.json").read_text()) == stamp:
            arrays = {f.stem: np.load(f, mmap_mode="r") for f in directory.glob("*.npy")}
            return DocPairArrays(arrays["query_P"], arrays["doc_a_P"], arrays["doc_b_P"], arrays.get("scores_Px2"),
                                 IdTable(arrays.get("query_table")), IdTable(arrays.get("doc_table")))
    except (OSError, ValueError, KeyError):
        pass
    return None


def _named(pairs: DocPairArrays) -> dict[str, np.ndarray | None]:
    return {"query_P": pairs.query_P, "doc_a_P": pairs.doc_a_P, "doc_b_P": pairs.doc_b_P,
            "scores_Px2": pairs.scores_Px2, "query_table": pairs.query_ids.table, "doc_table": pairs.doc_ids.table}


CACHE_VERSION = 1


def load_docpairs(path: str | os.PathLike, columns: Sequence[str] = LOCAL_COLUMNS, *,
                  fingerprint: dict | None = None) -> DocPairArrays:
    """`read_docpairs`, cached: the arrays are saved once under `$SCE_JAX_CACHE_DIR/docpairs/` (keyed by the
    file's absolute path and the columns, checked against its size, modification time and content fingerprint,
    `files.content_fingerprint`, computed here unless given) and memory-mapped, the
    first time as well: decimal ids and scores go into the cache files as they are read, so the first read holds
    only the chunks being parsed, and a restart or `--resume` costs about a second. The arrays are file-backed
    pages either way. Best effort: a cache that cannot be written is skipped (the arrays are then in memory)."""

    path = Path(path).absolute()
    stat = path.stat()
    key = hashlib.sha1(f"{path}\0{','.join(columns)}".encode("utf-8", "surrogateescape")).hexdigest()
    directory = cache_dir() / "docpairs" / key
    if fingerprint is None:
        fingerprint = content_fingerprint(path)
    stamp = {"version": CACHE_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "content": fingerprint}
    cached = _cached(directory, stamp)
    if cached is not None:
        return cached
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{key}."))
    except OSError:
        return read_docpairs(path, columns)
    try:
        try:
            pairs = _read_docpairs(path, columns, CHUNK_BYTES, _Columns(staging))
        except _CacheWriteError:
            pairs = None  # read into memory below, without the cache
        if pairs is not None:
            try:
                for name, array in _named(pairs).items():  # ids that needed a table: in memory so far
                    if array is not None and not isinstance(array, np.memmap) and array.dtype != object:
                        np.save(staging / f"{name}.npy", array)
                (staging / "stamp.json").write_text(json.dumps(stamp))
                shutil.rmtree(directory, ignore_errors=True)
                os.replace(staging, directory)
            except OSError:  # e.g. another process put its copy in place first
                pass
            cached = _cached(directory, stamp)
            # Without a cache, the arrays are still backed by the staging files, about to be removed: copied.
            pairs = cached if cached is not None else DocPairArrays(
                *(None if a is None else np.array(a) for a in pairs[:4]), *pairs[4:])
            release_free_memory()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return pairs if pairs is not None else read_docpairs(path, columns)


def read_docpairs(path: str | os.PathLike, columns: Sequence[str] = LOCAL_COLUMNS, *,
                  chunk_bytes: int = CHUNK_BYTES) -> DocPairArrays:
    """Read a pairs file (`.gz` allowed). `columns` names each tab-separated field: qid, doc_a, doc_b and
    optionally score_a, score_b. For the local format (the default) the two scores are optional as a pair:
    the file's first line decides whether lines have 3 or 5 fields."""
    return _read_docpairs(path, columns, chunk_bytes, _Columns())


def _read_docpairs(path, columns: Sequence[str], chunk_bytes: int, out: _Columns) -> DocPairArrays:
    """`read_docpairs` putting the columns into `out`. A group of id columns (queries; documents) whose ids are
    all decimal int32 needs no table and goes to `out` chunk by chunk; at its first other id it is taken back
    (in memory) and interned once the whole file is read."""
    tabled: dict[str, dict[str, list] | None] = {group: None for group in _ID_GROUPS}
    line, count = 1, 0
    pending: collections.deque = collections.deque()
    workers = max(1, min(4, os.cpu_count() or 1))

    def collect(future) -> None:
        nonlocal count
        chunk = future.result()
        for group, names in _ID_GROUPS.items():
            if tabled[group] is None:
                if all(chunk.ids[n][0] is None and chunk.ids[n][1].dtype == np.int32 for n in names):
                    for name in names:
                        out.append(_SAVED[name], chunk.ids[name][1])
                    continue
                tabled[group] = {}
                for name in names:  # ids that need a table: the earlier chunks' int32 ids come back
                    earlier = out.take(_SAVED[name])
                    tabled[group][name] = [] if earlier is None else [(None, np.array(earlier))]
            for name in names:
                tabled[group][name].append(chunk.ids[name])
        if chunk.scores is not None:
            out.append("scores_Px2", chunk.scores)
        count += len(chunk.ids["qid"][1] if chunk.ids["qid"][1] is not None else chunk.ids["qid"][0])

    try:
        # Chunks are parsed in threads (numpy releases the GIL), a few at a time so memory stays bounded.
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="read-docpairs") as pool:
            for data in line_chunks(path, chunk_bytes):
                if line == 1:
                    data = data.removeprefix(UTF8_BOM)  # a BOM belongs to the file, not to its first id
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
        arrays, tables = {}, {}
        for group, names in _ID_GROUPS.items():
            if tabled[group] is None:
                arrays.update((name, out.take(_SAVED[name])) for name in names)
                tables[group] = IdTable(None)
            else:
                interned, tables[group] = _intern([tabled[group][name] for name in names])
                arrays.update(zip(names, interned))
        scores_Px2 = out.take("scores_Px2")
    finally:
        out.close()
    release_free_memory()
    return DocPairArrays(arrays["qid"], arrays["doc_a"], arrays["doc_b"], scores_Px2, tables["query"], tables["doc"])
