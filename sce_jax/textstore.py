"""Id -> text lookups in a local collection without holding it in memory.

A collection is a TSV file (`id<TAB>text[<TAB>more...]`, further fields join the text with a space) or, by its
name (`.json`/`.jsonl` among the suffixes), JSON lines of `{"docno"|"doc_id"|"qid"|"query_id": ..., "text": ...}`.
`TextStore.open` builds, in one streaming pass, an index of the file: the 64-bit FNV-1a hash of every id, sorted,
with the byte offset, length and line number of its line. The index is cached (beside the file when its
directory is writable, else under `$SCE_JAX_CACHE_DIR` or `~/.cache/sce_jax`), keyed by the file's canonical
path, size and modification time, written atomically and checked (a checksum over its arrays) when loaded; its
arrays are memory-mapped. A lookup hashes the id, finds its line(s) by binary search, reads the line and checks the id,
so only the texts asked for are read and decoded.

The indexing pass validates every line (an id, a tab, then the text; JSON objects with a string text), leaves
out a UTF-8 BOM at the start of a line (the file's, or one that concatenated files carried along), reports
non-UTF-8 bytes and lone surrogates as file:line, and rejects a second, different text for one id (a repeated
identical line is fine; the first is used).

`.gz` collections are decompressed once into the cache (same key, and checked at every use like an index: its
size and content fingerprint) and the decompressed copy is indexed: random access into gzip data is not
possible, and one copy costs disk, not memory. Temporary files of a killed process are removed by the next one
(`sce_jax.files`). A JSON list (`[...]`, not JSON lines) cannot be indexed by line and is read into memory (such
files are small in practice).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sce_jax import idhash
from sce_jax.cache import CACHE_ENV, cache_dir
from sce_jax.errors import InputError, Interrupted, MissingTextError, located, user_path
from sce_jax.files import (GZIP_ERRORS, atomic_write, check_readable, check_text, content_fingerprint, decode_line,
                           remove_stale_temporaries)
from sce_jax.memory import join_freeing, release_free_memory
from sce_jax.runs import json_records

INDEX_MAGIC = b"SCEJAX-TEXTSTORE-3\n"
# Bytes per read in the indexing pass (whole lines: a chunk ends at its last newline).
CHUNK_BYTES = 32 << 20
_VERIFY_BYTES = 8 << 20  # bytes per read when an index's checksum is verified
ID_FIELDS = ("docno", "doc_id", "qid", "query_id")
TEXT_FIELDS = ("text", "query")

def is_json_collection(path: str | os.PathLike) -> bool:
    return any(suffix in (".json", ".jsonl") for suffix in Path(path).suffixes)


def _source_key(path: Path) -> dict:
    """What a cached index or decompressed copy is made from: the file's canonical path (`/x/../x/a` and a
    symlink to it are one file), size and modification time."""
    stat = path.stat()
    return {"path": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_name(key: dict, suffix: str) -> str:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
    return f"{Path(key['path']).name}.{digest}{suffix}"


def _index_locations(source: Path, key: dict) -> list[Path]:
    """Where an index may be: beside the file (if its directory is writable), then in the cache."""
    places = []
    source = Path(key["path"])
    if os.access(source.parent, os.W_OK):
        places.append(source.parent / f".{source.name}.sce_jax-index")
    places.append(cache_dir() / "textstore" / _cache_name(key, ".index"))
    return places


def _gunzipped_copy(path: Path) -> Path:
    """A decompressed copy of a `.gz` collection in the cache, made once. Its record (`NAME.json` beside it:
    the source's key, the copy's size and content fingerprint) is checked at every use, like an index: a copy
    that is incomplete or changed, or of another version of the source, is made again. Ctrl-C, SIGTERM or a
    full disk while it is made leave no partial copy (and say so); a cache that cannot be written is one line."""
    key = _source_key(path)
    copy = cache_dir() / "textstore" / _cache_name(key, ".txt")
    record = copy.with_name(copy.name + ".json")
    if _copy_matches(copy, record, key):
        return copy
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(copy)
        with atomic_write(copy, "wb") as out, gzip.open(path, "rb") as f:
            shutil.copyfileobj(f, out, 16 << 20)
        with atomic_write(record, "w") as out:
            json.dump({**key, "copy": content_fingerprint(copy)}, out)
    except GZIP_ERRORS as error:  # before OSError: BadGzipFile is one
        raise InputError(f"{path}: not a valid gzip file (corrupt or truncated): {error}") from None
    except Interrupted as error:
        raise Interrupted(error.signum, f"{path} was being decompressed into the cache; the partial copy was "
                          "removed") from None
    except (OSError, InputError) as error:
        reason = f"{error.strerror}: {error.filename}" if isinstance(error, OSError) else str(error)
        raise InputError(f"{path}: cannot decompress it into the cache ({reason}); set {CACHE_ENV} to a writable "
                         "directory with room for it") from None
    return copy


def _copy_matches(copy: Path, record: Path, key: dict) -> bool:
    try:
        saved = json.loads(record.read_text())
        return all(saved.get(name) == value for name, value in key.items()) and \
            saved.get("copy") == content_fingerprint(copy)
    except (OSError, ValueError, AttributeError):
        return False


class _Index:
    """Sorted id hashes with each line's offset, length and line number (memory-mapped arrays)."""

    FIELDS = (("hashes", np.uint64), ("offsets", np.int64), ("lengths", np.int64), ("lines", np.int64))

    def __init__(self, hashes, offsets, lengths, lines):
        self.hashes, self.offsets, self.lengths, self.lines = hashes, offsets, lengths, lines

    def save(self, path: Path, key: dict) -> None:
        arrays = [np.ascontiguousarray(getattr(self, name), dtype) for name, dtype in self.FIELDS]
        digest = hashlib.blake2b(digest_size=16)
        for array in arrays:
            digest.update(memoryview(array).cast("B"))
        header = json.dumps({**key, "count": len(self.hashes), "checksum": digest.hexdigest()}).encode()
        header = header + b" " * (-(len(INDEX_MAGIC) + 8 + len(header)) % 64)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as f:
            f.write(INDEX_MAGIC + len(header).to_bytes(8, "little") + header)
            for array in arrays:
                f.write(memoryview(array).cast("B"))

    @classmethod
    def load(cls, path: Path, key: dict) -> _Index | None:
        """The index at `path` if it is complete, for this file (key) and verifies; else None."""
        try:
            with open(path, "rb") as f:
                if f.read(len(INDEX_MAGIC)) != INDEX_MAGIC:
                    return None
                header_length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_length))
            if any(header.get(name) != value for name, value in key.items()):
                return None
            count = int(header["count"])
            start = len(INDEX_MAGIC) + 8 + header_length
            if path.stat().st_size != start + count * 8 * len(cls.FIELDS):
                return None
            # The checksum reads the file (the arrays one after the other) in blocks rather than through the
            # memory maps, so verifying does not make every page of the index resident in this process.
            digest = hashlib.blake2b(digest_size=16)
            with open(path, "rb", buffering=0) as f:
                f.seek(start)
                block = bytearray(_VERIFY_BYTES)
                while n := f.readinto(block):
                    digest.update(memoryview(block)[:n])
            if digest.hexdigest() != header["checksum"]:
                return None
            return cls(*(np.memmap(path, dtype, "r", offset=start + i * count * 8, shape=(count,)) if count else
                         np.zeros(0, dtype) for i, (_, dtype) in enumerate(cls.FIELDS)))
        except (OSError, ValueError, KeyError, TypeError):
            return None


class TextStore:
    """Texts of a local collection by id, read from disk on demand (see the module's docstring)."""

    def __init__(self, path: Path, kind: str, *, data: Path | None = None, index: _Index | None = None,
                 texts: dict[str, str] | None = None):
        self.path = path  # the user's file, for messages
        self.kind = kind
        self._data = data  # the file the index points into (a decompressed copy for .gz)
        self._index = index
        self._texts = texts  # in-memory fallback (JSON list files)
        self._file = open(data, "rb") if data is not None else None
        self._json = is_json_collection(path)
        self.texts_read = 0  # lines read and decoded by lookups (for tests that count)

    @classmethod
    def open(cls, path: str | os.PathLike, *, kind: str = "documents") -> TextStore:
        """The store of the collection at `path`, building (or reusing) its cached index."""
        path = user_path(path)
        check_readable(path, f"{kind} file")
        if not path.is_file():
            raise InputError(f"{path}: not a regular file (a pipe?); a {kind} file is indexed and its lines read by "
                             "offset, so save it to a file first")
        data = _gunzipped_copy(path) if path.name.endswith(".gz") else path
        if is_json_collection(path) and _starts_with_bracket(data):
            return cls(path, kind, texts=_read_json_list(path, data))
        key = {**_source_key(data), "format": "json" if is_json_collection(path) else "tsv"}
        places = _index_locations(data, key)
        for place in places:
            index = _Index.load(place, key)
            if index is not None:
                return cls(path, kind, data=data, index=index)
        index = _build_index(path, data, key["format"])
        for place in places:
            remove_stale_temporaries(place)
            try:
                index.save(place, key)
            except (OSError, InputError):  # not writable, or full: the next place, or the index in memory
                continue
            loaded = _Index.load(place, key)
            if loaded is not None:
                index = loaded
                break
        release_free_memory()  # the indexing pass's freed chunks (or the built arrays, now memory-mapped)
        return cls(path, kind, data=data, index=index)

    def __len__(self) -> int:
        return len(self._texts) if self._texts is not None else len(self._index.hashes)

    def __contains__(self, text_id: str) -> bool:
        return self._lookup([text_id])[0] is not None

    def __enter__(self) -> TextStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def get_many(self, ids: Sequence[str]) -> list[str]:
        """The texts of `ids`, in order; MissingTextError (naming the file and up to 5 ids) if any is absent."""

        texts = self._lookup(ids)
        missing = [text_id for text_id, text in zip(ids, texts) if text is None]
        if missing:
            unique = list(dict.fromkeys(missing))
            shown = ", ".join(unique[:5]) + (", ..." if len(unique) > 5 else "")
            raise MissingTextError(f"{self.path}: no text for {len(unique)} {self.kind} ({shown})")
        return texts

    def absent(self, ids: np.ndarray) -> np.ndarray:
        """A mask of the ids (UTF-8 bytes in a numpy `S` array) that are certainly not in the store, from the index
        alone (no reads: a present hash means present unless two ids share a 64-bit hash, which `get_many` checks)."""
        if self._texts is not None:
            return np.array([i.decode("utf-8") not in self._texts for i in ids.tolist()], bool)
        if not len(self._index.hashes):
            return np.ones(len(ids), bool)
        hashes = idhash.hash_fixed(ids)
        order = np.argsort(hashes)  # sorted probes walk the memory-mapped index in order
        where = np.minimum(np.searchsorted(self._index.hashes, hashes[order]), len(self._index.hashes) - 1)
        absent = np.empty(len(ids), bool)
        absent[order] = self._index.hashes[where] != hashes[order]
        return absent

    def lookup(self, ids: Sequence[str]) -> list[str | None]:
        """The texts of `ids`, None for those absent."""
        return self._lookup(ids)

    def _lookup(self, ids: Sequence[str]) -> list[str | None]:
        ids = list(ids)
        if self._texts is not None:
            return [self._texts.get(text_id) for text_id in ids]
        encoded = [text_id.encode("utf-8", "surrogatepass") for text_id in ids]
        hashes = idhash.hash_ids(encoded)
        index = self._index
        lo = np.searchsorted(index.hashes, hashes, "left")
        hi = np.searchsorted(index.hashes, hashes, "right")
        result: list[str | None] = [None] * len(ids)
        cache: dict[int, tuple[str, str]] = {}
        # Read in file order, each distinct line once.
        wanted = [(int(index.offsets[j]), i, j) for i in range(len(ids)) for j in range(lo[i], hi[i])]
        wanted.sort()
        for offset, i, j in wanted:
            if result[i] is not None:
                continue
            if offset not in cache:
                raw = os.pread(self._file.fileno(), int(index.lengths[j]), offset)
                self.texts_read += 1
                cache[offset] = self._parse(raw, int(index.lines[j]))
            text_id, text = cache[offset]
            if text_id == ids[i]:
                result[i] = text
        return result

    def _parse(self, raw: bytes, line_no: int) -> tuple[str, str]:
        line = decode_line(raw, self.path, line_no).rstrip("\r\n")
        if self._json:
            return _json_line(json.loads(line), self.path, line_no)
        text_id, _, text = line.partition("\t")
        return text_id, text.replace("\t", " ")


def _starts_with_bracket(data: Path) -> bool:
    with open(data, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _json_line(record, path, where) -> tuple[str, str]:
    """(id, text) of one JSON record; ids may be strings or integers (not floats, booleans, lists)."""
    if isinstance(record, dict):
        text_id = next((record[name] for name in ID_FIELDS if record.get(name) is not None), None)
        text = next((record[name] for name in TEXT_FIELDS if name in record), None)
        if isinstance(text_id, int) and not isinstance(text_id, bool):
            text_id = str(text_id)
        if isinstance(text_id, str) and text_id and isinstance(text, str):
            check_text(text_id, path, where, "id")
            return text_id, check_text(text, path, where, "text")
    raise located(path, where, 'expected an object with "docno" (or "doc_id") as a string or integer and a string '
                  '"text"')


def _read_json_list(path: Path, data: Path) -> dict[str, str]:
    texts = {}
    for where, record in json_records(data):
        text_id, text = _json_line(record, path, where)
        if texts.setdefault(text_id, text) != text:
            raise located(path, where, f"a second, different text for id {text_id!r}")
    return texts


def _build_index(path: Path, data: Path, fmt: str) -> _Index:
    """One streaming pass over `data`: every line validated, ids hashed; then sorted and checked for repeats."""
    hashes, offsets, lengths, lines = [], [], [], []
    line_base = 0
    position = 0
    with open(data, "rb") as f:
        carry = b""
        while True:
            block = f.read(CHUNK_BYTES)
            if not block and not carry:
                break
            chunk = carry + block
            if block:
                cut = chunk.rfind(b"\n") + 1
                if cut == 0:
                    carry = chunk
                    continue
                chunk, carry = chunk[:cut], chunk[cut:]
            else:
                carry = b""
            parts = (_index_tsv_chunk if fmt == "tsv" else _index_json_chunk)(chunk, path, line_base)
            h, o, n, ln, chunk_lines = parts
            hashes.append(h)
            offsets.append(o + position)
            lengths.append(n)
            lines.append(ln)
            position += len(chunk)
            line_base += chunk_lines
    # Memory: the per-chunk parts are joined (and freed) one array at a time, and each array is sorted (then
    # filtered) in turn, so the peak holds the index plus one array, not two or three copies of it.
    hashes = join_freeing(hashes) if hashes else np.zeros(0, np.uint64)
    offsets = join_freeing(offsets) if offsets else np.zeros(0, np.int64)
    lengths = join_freeing(lengths) if lengths else np.zeros(0, np.int64)
    lines = join_freeing(lines) if lines else np.zeros(0, np.int64)
    release_free_memory()
    # By hash, lines of one hash in file order: offsets ascend in file order, and the sort is stable.
    order = np.argsort(hashes, kind="stable")
    hashes = hashes[order]
    offsets = offsets[order]
    lengths = lengths[order]
    lines = lines[order]
    del order
    keep = _drop_repeats(path, data, fmt, hashes, offsets, lengths, lines)
    if keep is not None:
        hashes = hashes[keep]
        offsets = offsets[keep]
        lengths = lengths[keep]
        lines = lines[keep]
    return _Index(hashes, offsets, lengths, lines)


def _drop_repeats(path, data, fmt, hashes, offsets, lengths, lines) -> np.ndarray | None:
    """A mask keeping each id's first line (None: every line is kept); a repeated id with a different text is an
    InputError."""
    same = np.flatnonzero(hashes[1:] == hashes[:-1])
    if not same.size:
        return None
    keep = np.ones(len(hashes), bool)
    store = TextStore(path, "texts", data=data, index=_Index(hashes, offsets, lengths, lines))
    with store:
        groups = np.split(np.arange(len(hashes)), np.flatnonzero(hashes[1:] != hashes[:-1]) + 1)
        for group in (g for g in groups if len(g) > 1):
            seen: dict[str, tuple[str, int]] = {}
            for j in group.tolist():  # offsets ascending within a hash: file order
                raw = os.pread(store._file.fileno(), int(lengths[j]), int(offsets[j]))
                text_id, text = store._parse(raw, int(lines[j]))
                if text_id in seen:
                    first_text, first_line = seen[text_id]
                    if first_text != text:
                        raise located(path, int(lines[j]), f"a second, different text for id {text_id!r} (first "
                                      f"at line {first_line})")
                    keep[j] = False
                else:
                    seen[text_id] = (text, int(lines[j]))
    return keep


def _line_spans(chunk: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The chunk as uint8, its lines' starts and ends (ends exclusive of the newline and a `\\r` before it).

    A UTF-8 BOM at the start of a line is left out of it: a file starts with one, and files concatenated into
    one collection carry theirs to the start of a line. Lookups read lines from the stored start, so the id is
    the same at indexing and lookup."""
    buffer = np.frombuffer(chunk, np.uint8)
    newlines = np.flatnonzero(buffer == 10)
    ends = newlines if chunk.endswith(b"\n") else np.concatenate([newlines, [len(chunk)]])
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    ends = ends.astype(np.int64)
    if len(buffer) >= 3:
        at = [buffer[np.minimum(starts + k, len(buffer) - 1)] for k in range(3)]
        starts += 3 * ((ends - starts >= 3) & (at[0] == 0xEF) & (at[1] == 0xBB) & (at[2] == 0xBF))
    cr = (ends > starts) & (buffer[np.maximum(ends - 1, 0)] == 13)
    return buffer, starts, ends - cr


def _check_utf8(chunk: bytes, starts: np.ndarray, path, line_base: int) -> None:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as error:
        line = int(np.searchsorted(starts, error.start, "right"))
        column = error.start - int(starts[line - 1]) + 1
        raise located(path, line_base + line, f"not UTF-8 (byte {chunk[error.start]:#04x} at column {column})") \
            from None


def _index_tsv_chunk(chunk: bytes, path, line_base: int):
    buffer, starts, ends = _line_spans(chunk)
    _check_utf8(chunk, starts, path, line_base)
    tabs = np.flatnonzero(buffer == 9)
    first_tab = tabs[np.minimum(np.searchsorted(tabs, starts), max(len(tabs) - 1, 0))] if len(tabs) else \
        np.full(len(starts), -1)
    has_id = (first_tab < ends) & (first_tab > starts)
    line_numbers = line_base + 1 + np.arange(len(starts))
    blank = np.zeros(len(starts), bool)
    for i in np.flatnonzero(~has_id).tolist():
        line = chunk[starts[i] : ends[i]]
        if line.strip():
            raise located(path, int(line_numbers[i]), "expected an id, a tab, then the text")
        blank[i] = True
    keep = ~blank
    starts, ends, first_tab = starts[keep], ends[keep], first_tab[keep]
    hashes = idhash.hash_spans(buffer, starts, first_tab - starts)
    # The stored length covers the line up to (not including) its newline.
    return hashes, starts, ends - starts, line_numbers[keep], len(line_numbers)


def _index_json_chunk(chunk: bytes, path, line_base: int):
    buffer, starts, ends = _line_spans(chunk)
    _check_utf8(chunk, starts, path, line_base)
    ids, kept = [], []
    for i, (start, end) in enumerate(zip(starts.tolist(), ends.tolist())):
        line = chunk[start:end]
        if not line.strip():
            continue
        line_no = line_base + 1 + i
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise located(path, line_no, f"malformed JSON: {error.msg}") from None
        text_id, _ = _json_line(record, path, line_no)
        ids.append(text_id.encode("utf-8"))
        kept.append(i)
    kept = np.asarray(kept, np.int64)
    return (idhash.hash_ids(ids), starts[kept], (ends - starts)[kept], line_base + 1 + kept, len(starts))
