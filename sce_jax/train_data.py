"""Training data: samples from JSONL or ir_datasets docpairs, a deterministic resumable order, and prefetched
tokenized batches.

A sample is one query with its documents and a label per document (teacher scores for distillation losses,
relevance otherwise). Sample `k` of the stream is element `perm_e[k % n]` with `e = k // n` and `perm_e` a
permutation seeded by `(seed, e)`, so the stream is a pure function of the seed and the position `k`: resuming
needs nothing but the position.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from tqdm.auto import tqdm

from sce_jax.batch import bucket_length, length_buckets, make_batch
from sce_jax.runs import InputError

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

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> TrainSample: ...


class JsonlSamples:
    """One sample per line: {"query": str, "docs": [str, ...], "labels": [float, ...]}.

    The whole file is validated up front (so bad data fails before training); afterwards only line offsets stay
    in memory and lines are read on demand.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        offsets = []
        self.num_docs = 0
        with open(self.path, "rb") as f:
            offset = 0
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    self.num_docs = max(self.num_docs, len(self._parse(line, f"{self.path}: line {line_number}").docs))
                    offsets.append(offset)
                offset += len(line)
        if not offsets:
            raise TrainDataError(f"{self.path}: contains no training samples")
        self._offsets = np.asarray(offsets, np.int64)
        self._file = None

    def _parse(self, line: bytes, where: str) -> TrainSample:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainDataError(f"{where}: not valid JSON ({e})") from None
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
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(self._offsets[index])
        return self._parse(self._file.readline(), f"{self.path}: sample {index}")


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


class DocPairSamples:
    """Samples from an ir_datasets dataset with docpairs: labels are the pair's scores if it has them
    (distillation), else [1, 0]."""

    num_docs = 2

    def __init__(self, dataset_id: str):
        import ir_datasets

        register_kd_docpairs()
        try:
            dataset = ir_datasets.load(dataset_id)
        except KeyError:
            raise TrainDataError(f"{dataset_id!r} is neither a file nor an ir_datasets id") from None
        for part in ("docpairs", "queries", "docs"):
            if not getattr(dataset, f"has_{part}")():
                raise TrainDataError(f"ir_datasets {dataset_id!r} has no {part}")
        self.dataset_id = dataset_id
        try:
            self.queries = {q.query_id: q.default_text() for q in dataset.queries_iter()}
            self._read_pairs(dataset)
        except OSError as e:
            raise TrainDataError(f"ir_datasets {dataset_id!r}: cannot read its files ({e})") from None
        if not len(self._pairs_Px3):
            raise TrainDataError(f"ir_datasets {dataset_id!r} has no docpairs")
        self._docs_store = dataset.docs_store()

    def _read_pairs(self, dataset) -> None:
        # Ids are interned to int32 so tens of millions of pairs fit in a few hundred MB.
        self._ids: list[str] = []
        index: dict[str, int] = {}
        intern = lambda x: index.setdefault(x, len(index))  # noqa: E731
        pairs, scores = [], []
        for pair in tqdm(dataset.docpairs_iter(), desc=f"reading {self.dataset_id}", unit=" pairs"):
            if pair.query_id not in self.queries:
                raise TrainDataError(f"ir_datasets {self.dataset_id!r}: docpair query {pair.query_id!r} has no text")
            pairs.append((intern(pair.query_id), intern(pair.doc_id_a), intern(pair.doc_id_b)))
            if hasattr(pair, "score_a"):
                scores.append((pair.score_a, pair.score_b))
        self._ids = list(index)
        self._pairs_Px3 = np.asarray(pairs, np.int32).reshape(-1, 3)
        self._scores_Px2 = np.asarray(scores, np.float32).reshape(-1, 2) if scores else None

    def __len__(self) -> int:
        return len(self._pairs_Px3)

    def __getitem__(self, index: int) -> TrainSample:
        query_id, doc_a, doc_b = (self._ids[i] for i in self._pairs_Px3[index])
        docs = [self._docs_store.get(doc_id).default_text() for doc_id in (doc_a, doc_b)]
        labels = [1.0, 0.0] if self._scores_Px2 is None else self._scores_Px2[index].tolist()
        return TrainSample(self.queries[query_id], docs, labels)


def load_samples(source: str) -> Samples:
    """A local JSONL file, or an ir_datasets id with docpairs."""
    if os.path.exists(source):
        return JsonlSamples(source)
    return DocPairSamples(source)


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

    def __init__(self, num_samples: int, seed: int, epoch: int):
        self.num_samples = num_samples
        self.evaluations = 0
        rng = np.random.default_rng([seed, epoch])
        if num_samples <= SMALL_DATASET:
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

    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError("no samples")
        self.num_samples, self.seed = num_samples, seed
        self._epochs: dict[int, EpochPermutation] = {}
        self.evaluations = 0  # elements of permutations computed (tests count the work with it)

    def _epoch(self, epoch: int) -> EpochPermutation:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # keep the current epoch and the one a batch may spill into
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = EpochPermutation(self.num_samples, self.seed, epoch)
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
        micro = [self._tokenize([self.samples[int(i)] for i in indices])
                 for indices in order.reshape(self.grad_accum, self.micro_batch_size)]
        doc_length = bucket_length(max(len(t) for _, docs, _ in micro for d in docs for t in d), self._buckets)
        mine = slice(self.process_index * self.local_size, (self.process_index + 1) * self.local_size)
        local = [self._micro_batch(q[mine], d[mine], s[mine], mine.start, doc_length) for q, d, s in micro]
        return TrainBatch(*(np.stack(field) for field in zip(*local)))

    def _tokenize(self, samples: list[TrainSample]):
        query_tokens = self.tokenizer.encode_queries([s.query for s in samples])
        doc_tokens = [self.tokenizer.encode_docs([q] * len(s.docs), s.docs) for q, s in zip(query_tokens, samples)]
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
