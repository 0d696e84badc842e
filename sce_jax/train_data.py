"""Training data: samples from JSONL or ir_datasets docpairs, a deterministic resumable order, and prefetched
tokenized batches.

A sample is one query with its documents and a label per document (teacher scores for distillation losses,
relevance otherwise). Sample `k` of the stream is element `perm_e[k % n]` with `e = k // n` and `perm_e` a
permutation seeded by `(seed, e)`, so the stream is a pure function of the seed and the position `k`: resuming
needs nothing but the position.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import queue
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from sce_jax.cache import cache_dir
from sce_jax.batch import bucket_length, length_buckets, make_batch
from sce_jax.memory import release_free_memory
from sce_jax.pairs import DocPairArrays, IdTable, line_chunks, load_docpairs
from sce_jax.errors import InputError
from sce_jax.files import content_fingerprint

KD_DOCPAIRS_ID = "msmarco-passage/train/kd-docpairs"
# Teacher scores of the BERT-CAT ensemble (Hofstätter et al., 2020), as the original trained on.
KD_DOCPAIRS_URL = (
    "https://zenodo.org/record/4068216/files/bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv?download=1"
)
KD_DOCPAIRS_MD5 = "4d99696386f96a7f1631076bcc53ac3c"


class TrainDataError(InputError):
    """Training data that cannot be used; the message names the file/dataset and line."""


class TrainSample(NamedTuple):
    query: str
    docs: list[str]
    labels: list[float]


class Samples(Protocol):
    """Random access to training samples; `num_docs` is the most documents any sample has."""

    num_docs: int
    fingerprint: dict | None  # `files.content_fingerprint` of the local file the samples come from

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> TrainSample: ...


# A `\\uD800`-`\\uDFFF` escape: a surrogate, valid only as a high + low pair; lines with one are checked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
INDEX_VERSION = 1


class JsonlSamples:
    """One sample per line: {"query": str, "docs": [str, ...], "labels": [float, ...]}.

    The first use of a file validates every line (one JSON parse per chunk of lines, the line-by-line parse only
    to name a bad line) and records the offsets of its samples; that index is cached (`cache_dir()/jsonl-index`,
    keyed by the file's absolute path and checked against its size and modification time), so later starts and
    resumes read only the index. Lines are read on demand.
    """

    def __init__(self, path: str | Path, *, chunk_bytes: int = 64 << 20):
        self.path = Path(path)
        try:
            stat = self.path.stat()
        except OSError as e:
            raise TrainDataError(f"{self.path}: cannot read ({e.strerror})") from None
        key = hashlib.sha1(str(self.path.absolute()).encode("utf-8", "surrogateescape")).hexdigest()
        self.index_path = cache_dir() / "jsonl-index" / f"{key}.npz"
        self.fingerprint = content_fingerprint(self.path)
        stamp = np.array([INDEX_VERSION, stat.st_size, stat.st_mtime_ns], np.int64)
        loaded = self._load_index(stamp)
        if loaded is None:
            loaded = self._build_index(chunk_bytes)
            self._save_index(stamp, *loaded)
        self._offsets, self._line_numbers, self.num_docs = loaded
        if not len(self._offsets):
            raise TrainDataError(f"{self.path}: contains no training samples")
        self._file = None
        self._lock = threading.Lock()

    def _load_index(self, stamp: np.ndarray):
        try:
            with np.load(self.index_path) as index:
                if np.array_equal(index["stamp"], stamp) and str(index["content"]) == self.fingerprint["blake2b"]:
                    return index["offsets"], index["line_numbers"], int(index["num_docs"])
        except (OSError, KeyError, ValueError, EOFError):
            pass
        return None

    def _save_index(self, stamp, offsets, line_numbers, num_docs) -> None:
        """Best effort: an index that cannot be written is rebuilt next time."""
        try:
            self.index_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.index_path.with_name(f".{self.index_path.name}.{os.getpid()}.tmp")
            with open(temporary, "wb") as f:
                np.savez(f, stamp=stamp, content=self.fingerprint["blake2b"], offsets=offsets,
                         line_numbers=line_numbers, num_docs=num_docs)
            os.replace(temporary, self.index_path)
        except OSError:
            pass

    def _build_index(self, chunk_bytes: int):
        offsets, line_numbers, num_docs = [], [], 0
        offset, first_line = 0, 1
        for data in line_chunks(self.path, chunk_bytes):
            starts, numbers, docs = self._check_chunk(data, first_line)
            offsets.append(starts + offset)
            line_numbers.append(numbers)
            num_docs = max(num_docs, docs)
            offset += len(data)
            first_line += data.count(b"\n") + (not data.endswith(b"\n"))
        concat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        return concat(offsets), concat(line_numbers), num_docs

    def _check_chunk(self, data: bytes, first_line: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Offsets (in `data`) and line numbers of the chunk's samples, and its most documents per sample."""
        buf = np.frombuffer(data, np.uint8)
        ends = np.flatnonzero(buf == 10)
        if not len(ends) or ends[-1] != len(buf) - 1:
            ends = np.append(ends, len(buf))
        starts = np.concatenate([[0], ends[:-1] + 1])
        # A line is blank when it has no byte other than whitespace.
        solid = np.concatenate([[0], np.cumsum(~np.isin(buf, (9, 10, 13, 32)))])
        keep = solid[ends] - solid[starts] > 0
        starts, ends = starts[keep], ends[keep]
        numbers = first_line + np.flatnonzero(keep)
        lines = [data[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
        try:
            records = json.loads(b"[" + b",".join(lines) + b"]")
        except ValueError:  # not JSON, or not UTF-8: find the line
            records = [self._parse(line, number) for line, number in zip(lines, numbers.tolist())]
        num_docs = 0
        for record, number in zip(records, numbers.tolist()):
            num_docs = max(num_docs, len(self._check(record, number).docs))
        for match in _SURROGATE_ESCAPE.finditer(data):
            row = int(np.searchsorted(ends, match.start()))
            if row < len(lines):
                self._parse(lines[row], int(numbers[row]))
        return starts.astype(np.int64), numbers.astype(np.int64), num_docs

    def _where(self, line_number: int) -> str:
        return f"{self.path}: line {line_number}"

    def _parse(self, line: bytes, line_number: int) -> TrainSample:
        try:
            record = json.loads(line)
        except UnicodeDecodeError as e:
            raise TrainDataError(f"{self._where(line_number)}: not valid UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise TrainDataError(f"{self._where(line_number)}: not valid JSON ({e})") from None
        sample = self._check(record, line_number)
        for text in (sample.query, *sample.docs):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise TrainDataError(f"{self._where(line_number)}: text is not valid Unicode ({e.reason})") from None
        return sample

    def _check(self, record, line_number: int) -> TrainSample:
        where = self._where(line_number)
        if not isinstance(record, dict):
            raise TrainDataError(f"{where}: expected a JSON object with query, docs and labels")
        missing = [key for key in ("query", "docs", "labels") if key not in record]
        if missing:
            raise TrainDataError(f"{where}: missing field(s) {', '.join(missing)}")
        query, docs, labels = record["query"], record["docs"], record["labels"]
        if not isinstance(query, str):
            raise TrainDataError(f"{where}: query must be a string")
        if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
            raise TrainDataError(f"{where}: docs must be a non-empty list of strings")
        if not isinstance(labels, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in labels
        ):
            raise TrainDataError(f"{where}: labels must be a list of finite numbers")
        if len(labels) != len(docs):
            raise TrainDataError(f"{where}: {len(docs)} docs but {len(labels)} labels")
        return TrainSample(query, docs, [float(x) for x in labels])

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> TrainSample:
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "rb")
            self._file.seek(int(self._offsets[index]))
            line = self._file.readline()
        return self._parse(line, int(self._line_numbers[index]))


class ScoredDocPair(NamedTuple):
    query_id: str
    doc_id_a: str
    doc_id_b: str
    score_a: float
    score_b: float


class KDDocPairs:
    """ir_datasets docpairs handler for lines `pos_score neg_score qid pid_pos pid_neg`."""

    def __init__(self, docpairs_dlc):
        self._docpairs_dlc = docpairs_dlc

    def docpairs_path(self):
        return self._docpairs_dlc.path()

    def docpairs_cls(self):
        return ScoredDocPair

    def docpairs_iter(self) -> Iterator[ScoredDocPair]:
        with self._docpairs_dlc.stream() as f:
            for line in codecs.getreader("utf8")(f):
                pos_score, neg_score, qid, pid_pos, pid_neg = line.split()
                yield ScoredDocPair(qid, pid_pos, pid_neg, float(pos_score), float(neg_score))

    def docpairs_handler(self):
        return self


def register_kd_docpairs() -> None:
    """Register `msmarco-passage/train/kd-docpairs`: MS MARCO train docs/queries/qrels + teacher-score pairs.

    The score file is downloaded on first use into the ir_datasets home; placing it there by hand
    (`msmarco-passage/train/kd-docpairs.tsv`) works offline.
    """
    import ir_datasets
    from ir_datasets.datasets.base import Dataset
    from ir_datasets.util import Download, RequestsDownload, home_path

    if KD_DOCPAIRS_ID in ir_datasets.registry:
        return
    cache_path = home_path() / "msmarco-passage" / "train" / "kd-docpairs.tsv"
    download = Download([RequestsDownload(KD_DOCPAIRS_URL)], cache_path=cache_path, expected_md5=KD_DOCPAIRS_MD5)
    train = ir_datasets.load("msmarco-passage/train")
    docpairs = KDDocPairs(download)
    ir_datasets.registry.register(
        KD_DOCPAIRS_ID, Dataset(train.docs_handler(), train.queries_handler(), train.qrels_handler(), docpairs)
    )


class TextLookup(Protocol):
    """Texts by id, many at once (sce_jax.textstore.TextStore, or the adapters below)."""

    def get_many(self, ids: Sequence[str]) -> list[str]: ...


class DictTexts:
    """Texts held in a dict (queries: at most a few hundred thousand)."""

    def __init__(self, texts: dict[str, str], source: str, kind: str):
        self.texts, self.source, self.kind = texts, source, kind

    def get_many(self, ids: Sequence[str]) -> list[str]:
        missing = [i for i in ids if i not in self.texts]
        if missing:
            raise TrainDataError(f"{self.source}: no text for {self.kind} {', '.join(sorted(set(missing))[:5])}")
        return [self.texts[i] for i in ids]

    def __contains__(self, text_id: str) -> bool:
        return text_id in self.texts


class DocsStoreTexts:
    """An ir_datasets docs store, looked up per batch (the collection is never read into memory)."""

    def __init__(self, docs_store, source: str):
        self.docs_store, self.source = docs_store, source

    def get_many(self, ids: Sequence[str]) -> list[str]:
        found = self.docs_store.get_many(list(dict.fromkeys(ids)))
        missing = [i for i in ids if i not in found]
        if missing:
            raise TrainDataError(f"{self.source}: no document {', '.join(sorted(set(missing))[:5])}")
        return [found[i].default_text() for i in ids]


def distinct_ids(columns: Sequence[np.ndarray]) -> np.ndarray:
    """The sorted distinct values of int32 id columns: a bitmap when the values are dense (MS MARCO's pids), so
    40M-row columns are neither sorted nor concatenated."""
    top = max(int(column.max(initial=0)) for column in columns)
    if top < 4 * sum(len(column) for column in columns) + (1 << 24):
        seen = np.zeros(top + 1, bool)
        for column in columns:
            seen[column] = True
        return np.flatnonzero(seen)
    distinct = np.unique(columns[0])
    for column in columns[1:]:
        distinct = np.union1d(distinct, np.unique(column))
    return distinct


def absent_ids(store, table: IdTable, interned: np.ndarray, *, block: int = 1 << 20) -> list[str]:
    """The ids (distinct `interned` values of `table`) that a TextStore does not hold, from its index alone
    (`TextStore.absent`, vectorised: no Python string per id), `block` ids at a time (the temporaries of 8.8M
    ids at once would be ~0.5 GB)."""
    absent = np.zeros(len(interned), bool)
    for start in range(0, len(interned), block):
        part = interned[start : start + block]
        if table.table is None:
            keys = part.astype(f"S{len(str(int(part.max(initial=0))))}")  # decimal ids: their digits
        elif table.table.dtype.kind == "i":
            values = table.table[part]
            keys = values.astype(f"S{len(str(int(values.max(initial=0))))}")
        else:
            keys = table.table[part]
        absent[start : start + block] = store.absent(keys)
    return table.strings(interned[absent])


def _checked_text(text: str, source: str, kind: str, text_id: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise TrainDataError(f"{source}: {kind} {text_id}: text is not valid Unicode ({error.reason})") from None
    return text


class DocPairSamples:
    """Samples from docpairs held as arrays (`sce_jax.pairs.DocPairArrays`); texts are looked up per batch.

    Labels are the pair's teacher scores if it has them (distillation), else [1, 0].
    """

    num_docs = 2

    def __init__(self, pairs: DocPairArrays, queries: TextLookup, docs: TextLookup, *, source: str,
                 queries_source: str, docs_source: str, fingerprint: dict | None = None):
        self.pairs, self.queries, self.docs = pairs, queries, docs
        self.fingerprint = fingerprint
        self.source, self.queries_source, self.docs_source = source, queries_source, docs_source

    @classmethod
    def from_files(cls, pairs_path: str | Path, queries_path: str | Path, docs_path: str | Path) -> DocPairSamples:
        from sce_jax.textstore import TextStore

        fingerprint = content_fingerprint(pairs_path)
        pairs = load_docpairs(pairs_path, fingerprint=fingerprint)
        queries = TextStore.open(queries_path, kind="queries")
        docs = TextStore.open(docs_path, kind="documents")
        for table, columns, store, flag, path in (
            (pairs.query_ids, (pairs.query_P,), queries, "--queries", queries_path),
            (pairs.doc_ids, (pairs.doc_a_P, pairs.doc_b_P), docs, "--docs", docs_path),
        ):
            missing = absent_ids(store, table, distinct_ids(columns))
            release_free_memory()
            if missing:
                shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
                raise TrainDataError(f"{pairs_path}: {len(missing)} ids have no text in {flag} {path} ({shown})")
        return cls(pairs, queries, docs, source=str(pairs_path), queries_source=str(queries_path),
                   docs_source=str(docs_path), fingerprint=fingerprint)

    @classmethod
    def from_ir_datasets(cls, dataset_id: str) -> DocPairSamples:
        import ir_datasets

        register_kd_docpairs()
        try:
            dataset = ir_datasets.load(dataset_id)
        except KeyError:
            raise TrainDataError(f"{dataset_id!r} is neither a file nor an ir_datasets id") from None
        for part in ("docpairs", "queries", "docs"):
            if not getattr(dataset, f"has_{part}")():
                raise TrainDataError(f"ir_datasets {dataset_id!r} has no {part}")
        source = f"ir_datasets {dataset_id!r}"
        try:
            queries = DictTexts({q.query_id: q.default_text() for q in dataset.queries_iter()}, source, "query")
            handler = dataset.docpairs_handler()
            if isinstance(handler, KDDocPairs):  # a TSV file: read vectorised
                pairs = load_docpairs(handler.docpairs_path(), KD_DOCPAIRS_COLUMNS)
            else:
                pairs = _docpairs_from_iter(dataset.docpairs_iter())
            docs = DocsStoreTexts(dataset.docs_store(), source)
        except OSError as e:
            raise TrainDataError(f"{source}: cannot read its files ({e})") from None
        if not len(pairs):
            raise TrainDataError(f"{source} has no docpairs")
        missing = [q for q in dict.fromkeys(pairs.query_ids.strings(np.unique(pairs.query_P))) if q not in queries]
        if missing:
            raise TrainDataError(f"{source}: docpair query {missing[0]!r} has no text")
        return cls(pairs, queries, docs, source=source, queries_source=source, docs_source=source)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> TrainSample:
        return self.get_many([index])[0]

    def get_many(self, indices: Sequence[int] | np.ndarray) -> list[TrainSample]:
        """The samples at `indices`, their texts fetched in two lookups (queries, documents)."""
        indices = np.asarray(indices, np.int64)
        p = self.pairs
        query_ids = p.query_ids.strings(p.query_P[indices])
        doc_ids = p.doc_ids.strings(np.concatenate([p.doc_a_P[indices], p.doc_b_P[indices]]))
        queries = [_checked_text(t, self.queries_source, "query", i)
                   for t, i in zip(self.queries.get_many(query_ids), query_ids)]
        docs = [_checked_text(t, self.docs_source, "document", i)
                for t, i in zip(self.docs.get_many(doc_ids), doc_ids)]
        n = len(indices)
        labels = [[1.0, 0.0]] * n if p.scores_Px2 is None else p.scores_Px2[indices].tolist()
        return [TrainSample(queries[k], [docs[k], docs[n + k]], labels[k]) for k in range(n)]


KD_DOCPAIRS_COLUMNS = ("score_a", "score_b", "qid", "doc_a", "doc_b")


def _docpairs_from_iter(docpairs: Iterator, chunk: int = 1 << 20) -> DocPairArrays:
    """Docpairs of another ir_datasets handler, interned chunk by chunk (ids are held once, in a dict)."""
    index: dict[str, int] = {}
    columns: list[list[np.ndarray]] = [[], [], [], []]
    scored = None
    buffer: list[tuple] = []

    def flush():
        if buffer:
            ids = np.array([[index.setdefault(x, len(index)) for x in row[:3]] for row in buffer], np.int32)
            for k in range(3):
                columns[k].append(ids[:, k])
            if scored:
                columns[3].append(np.array([row[3:] for row in buffer], np.float32))
            buffer.clear()

    for pair in docpairs:
        if scored is None:
            scored = hasattr(pair, "score_a")
        buffer.append((pair.query_id, pair.doc_id_a, pair.doc_id_b,
                       *((pair.score_a, pair.score_b) if scored else ())))
        if len(buffer) >= chunk:
            flush()
    flush()
    table = IdTable(np.array(list(index), dtype=object)) if index else IdTable(None)
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return DocPairArrays(cat(columns[0], np.int32), cat(columns[1], np.int32), cat(columns[2], np.int32),
                         cat(columns[3], np.float32) if scored else None, table, table)


def is_jsonl(path: str | Path) -> bool:
    """JSONL samples by the name (`.jsonl`/`.json`), pairs by `.tsv`/`.txt`; otherwise by the first character
    (`{` starts a JSON object)."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    if ".jsonl" in suffixes or ".json" in suffixes:
        return True
    if ".tsv" in suffixes or ".txt" in suffixes:
        return False
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{")


def load_samples(source: str, *, queries: str | None = None, docs: str | None = None) -> Samples:
    """A local JSONL file; a local pairs file (with `queries` and `docs` files); or an ir_datasets id with
    docpairs."""
    if os.path.exists(source):
        if is_jsonl(source):
            if queries or docs:
                raise TrainDataError(f"{source}: JSONL samples carry their texts; drop --queries/--docs")
            return JsonlSamples(source)
        if not (queries and docs):
            raise TrainDataError(f"{source}: a pairs file needs --queries and --docs (the texts of its ids)")
        for flag, path in (("--queries", queries), ("--docs", docs)):
            if not os.path.isfile(path):
                raise TrainDataError(f"{flag} {path}: no such file")
        return DocPairSamples.from_files(source, queries, docs)
    if queries or docs:
        raise TrainDataError(f"--queries/--docs go with a local pairs file; {source} is no file")
    return DocPairSamples.from_ir_datasets(source)


# Up to this many samples the order is a numpy permutation per epoch (cached: computed once per epoch, at most
# this size); above it, a stateless keyed permutation that maps each position on its own (O(batch) per step).
SMALL_DATASET = 1 << 20
_FEISTEL_ROUNDS = 6
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class EpochPermutation:
    """A seeded permutation of range(n) for one epoch, evaluated at any positions.

    n <= SMALL_DATASET: `np.random.default_rng([seed, epoch]).permutation(n)` (the order of earlier versions).
    Larger n: a keyed Feistel network on the smallest even number of bits that covers n, with cycle walking
    (values >= n are encrypted again until they fall below n), which is a bijection of range(n). Work and memory
    per call are O(positions), whatever n. `evaluations` counts the elements processed (for the tests).
    """

    def __init__(self, num_samples: int, seed: int, epoch: int, *, small: int = SMALL_DATASET):
        self.num_samples = num_samples
        self.evaluations = 0
        rng = np.random.default_rng([seed, epoch])
        if num_samples <= small:
            self._table = rng.permutation(num_samples)
            self.evaluations += num_samples
            return
        self._table = None
        self._half_bits = np.uint64(max(1, ((num_samples - 1).bit_length() + 1) // 2))
        self._half_mask = np.uint64((1 << int(self._half_bits)) - 1)
        self._keys = rng.integers(0, 1 << 63, size=_FEISTEL_ROUNDS, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        self.evaluations += len(x)
        left, right = x >> self._half_bits, x & self._half_mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._half_mask)
        return (left << self._half_bits) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        if self._table is not None:
            return self._table[indices]
        out = self._encrypt(np.asarray(indices, np.uint64))
        outside = np.flatnonzero(out >= self.num_samples)
        while len(outside):  # cycle walking; the domain is < 4n, so few rounds on average
            out[outside] = self._encrypt(out[outside])
            outside = outside[out[outside] >= self.num_samples]
        return out.astype(np.int64)


class SampleOrder:
    """The stream's order: position k is sample `perm_e(k mod n)` with e = k div n and `perm_e` an
    `EpochPermutation` seeded by (seed, e). A pure function of (n, seed, k): resuming needs the position only, and
    every process computes the same order. The current epoch's permutation is kept between calls."""

    def __init__(self, num_samples: int, seed: int, *, small: int = SMALL_DATASET):
        if num_samples < 1:
            raise ValueError("no samples")
        self.num_samples, self.seed, self.small = num_samples, seed, small
        self._epochs: dict[int, EpochPermutation] = {}
        self.evaluations = 0  # elements of permutations computed (tests count the work with it)

    def _epoch(self, epoch: int) -> EpochPermutation:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # keep the current epoch and the one a batch may spill into
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = EpochPermutation(self.num_samples, self.seed, epoch, small=self.small)
            self.evaluations += self._epochs[epoch].evaluations
        return self._epochs[epoch]

    def __call__(self, start: int, count: int) -> np.ndarray:
        """Sample indices of stream positions start .. start+count-1."""
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs = positions // self.num_samples
        out = np.empty(count, np.int64)
        for epoch in range(int(epochs[0]), int(epochs[-1]) + 1) if count else ():
            selected = epochs == epoch
            permutation = self._epoch(epoch)
            before = permutation.evaluations
            out[selected] = permutation(positions[selected] % self.num_samples)
            self.evaluations += permutation.evaluations - before
        return out


def sample_order(num_samples: int, seed: int, start: int, count: int) -> np.ndarray:
    """Indices of stream positions start .. start+count-1 (see SampleOrder; this one keeps no cache)."""
    return SampleOrder(num_samples, seed)(start, count)


class TrainBatch(NamedTuple):
    """One optimizer step's data on this host, as `grad_accum` micro-batches of `m` local samples each.

    query_ids [A, m, Lq]; doc_ids [A, m*N, Ld]; doc_query [A, m*N] (row of the document's query in the
    *global* micro-batch); labels, label_mask [A, m, N].
    """

    query_ids: np.ndarray
    doc_ids: np.ndarray
    doc_query: np.ndarray
    labels: np.ndarray
    label_mask: np.ndarray


class Tokenizer(Protocol):
    def encode_queries(self, queries: Sequence[str]) -> list[list[int]]: ...

    def encode_docs(self, query_tokens: Sequence[Sequence[int]], docs: Sequence[str]) -> list[list[int]]: ...


class BatchStream:
    """Tokenized training batches from stream position `start` on; host `process_index` of `process_count`
    takes its contiguous share of every global micro-batch.

    Document lengths are padded to a bucket of `max_length` (`length_buckets`) so the jitted step sees few
    shapes. Every host tokenizes the whole global batch to pick that bucket: the shapes, and so the dropout
    masks, are then the same whatever the number of hosts.
    """

    def __init__(
        self,
        samples: Samples,
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        grad_accum: int,
        max_query_length: int,
        max_length: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size % (grad_accum * process_count):
            raise ValueError(
                f"batch size {batch_size} is not divisible by grad_accum {grad_accum} x processes {process_count}"
            )
        self.samples = samples
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.micro_batch_size = batch_size // grad_accum
        self.local_size = self.micro_batch_size // process_count
        self.max_query_length = max_query_length
        self.max_length = max_length
        self.seed = seed
        self.order = SampleOrder(len(samples), seed)
        self.process_index = process_index
        self.process_count = process_count
        self._buckets = length_buckets(max_length)

    def batch_at(self, position: int) -> TrainBatch:
        """The batch made of stream positions position .. position + batch_size - 1 (this host's share)."""
        order = self.order(position, self.batch_size)
        micro = [self._tokenize(self._fetch(indices)) for indices in order.reshape(self.grad_accum, self.micro_batch_size)]
        doc_length = bucket_length(max(len(t) for _, docs, _ in micro for d in docs for t in d), self._buckets)
        mine = slice(self.process_index * self.local_size, (self.process_index + 1) * self.local_size)
        local = [self._micro_batch(q[mine], d[mine], s[mine], mine.start, doc_length) for q, d, s in micro]
        return TrainBatch(*(np.stack(field) for field in zip(*local)))

    def _fetch(self, indices: np.ndarray) -> list[TrainSample]:
        get_many = getattr(self.samples, "get_many", None)
        return get_many(indices) if get_many else [self.samples[int(i)] for i in indices]

    def _tokenize(self, samples: list[TrainSample]):
        query_tokens = self.tokenizer.encode_queries([s.query for s in samples])
        # One tokenizer call for all documents of the micro-batch (a call per sample costs more than the work).
        flat = self.tokenizer.encode_docs([q for q, s in zip(query_tokens, samples) for _ in s.docs],
                                          [d for s in samples for d in s.docs])
        ends = np.cumsum([len(s.docs) for s in samples]).tolist()
        doc_tokens = [flat[end - len(s.docs):end] for end, s in zip(ends, samples)]
        return query_tokens, doc_tokens, samples

    def _micro_batch(self, query_tokens, doc_tokens, samples, first_row: int, doc_length: int) -> TrainBatch:
        num_docs = self.samples.num_docs
        labels = np.zeros((len(samples), num_docs), np.float32)
        label_mask = np.zeros((len(samples), num_docs), bool)
        flat_docs: list[list[int]] = []
        for i, (tokens, sample) in enumerate(zip(doc_tokens, samples)):
            # Padding document slots are empty token lists, which make_batch pads to all-padding rows.
            flat_docs += tokens + [[]] * (num_docs - len(tokens))
            labels[i, : len(sample.labels)] = sample.labels
            label_mask[i, : len(sample.labels)] = True
        doc_query = np.repeat(np.arange(first_row, first_row + len(samples)), num_docs)
        batch = make_batch(query_tokens, flat_docs, doc_query, query_length=self.max_query_length,
                           doc_length=doc_length)
        return TrainBatch(batch.query_ids, batch.doc_ids, batch.doc_query, labels, label_mask)

    def iterate(self, start: int, prefetch: int = 4) -> Iterator[tuple[int, TrainBatch]]:
        """(position after the batch, batch) from `start` on, made `prefetch` batches ahead in a thread."""

        def produce(position: int):
            while True:
                yield position + self.batch_size, self.batch_at(position)
                position += self.batch_size

        return prefetched(produce(start), prefetch)


def prefetched(iterator: Iterator, size: int) -> Iterator:
    """Run `iterator` in a daemon thread, `size` items ahead; its exceptions re-raise in the consumer."""
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            items.put((done, e))
            return
        items.put((done, None))

    thread = threading.Thread(target=work, daemon=True, name="train-data-prefetch")
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
