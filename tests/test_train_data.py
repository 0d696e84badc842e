"""Training data at scale: the sample order's cost, local docpairs, the JSONL index, bad data."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest

from sce_jax.errors import InputError
from sce_jax.pairs import read_docpairs
from sce_jax.train_data import (
    SMALL_DATASET,
    BatchStream,
    DocPairSamples,
    EpochPermutation,
    JsonlSamples,
    SampleOrder,
    load_samples,
    sample_order,
)


def reference_order(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """The order of earlier versions: a fresh numpy permutation of all n per epoch."""
    positions = np.arange(start, start + count)
    permutations = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in set(positions // n)}
    return np.array([permutations[k // n][k % n] for k in positions])


@pytest.mark.parametrize("n, start, count", [(7, 0, 21), (7, 5, 10), (1000, 990, 32), (SMALL_DATASET, 3, 40)])
def test_small_datasets_keep_the_previous_order(n, start, count):
    np.testing.assert_array_equal(sample_order(n, 3, start, count), reference_order(n, 3, start, count))


@pytest.mark.parametrize("n", [2, 3, 17, 1000, 4097, 65536])
def test_keyed_permutation_is_a_bijection_per_epoch(n):
    """The large-dataset path (forced here with small=1) on sizes of every parity of bit length."""
    for epoch in (0, 1):
        values = EpochPermutation(n, 5, epoch, small=1)(np.arange(n))
        assert values.min() == 0 and values.max() == n - 1 and len(np.unique(values)) == n
    order = SampleOrder(n, 5, small=1)
    whole = order(n - 1, 3)  # across an epoch boundary
    np.testing.assert_array_equal(whole[:1], EpochPermutation(n, 5, 0, small=1)(np.array([n - 1])))
    np.testing.assert_array_equal(whole[1:], EpochPermutation(n, 5, 1, small=1)(np.arange(2)))
    np.testing.assert_array_equal(SampleOrder(n, 5, small=1)(n, 2), whole[1:])  # resumable from the position
    if n >= 1000:
        assert not np.array_equal(SampleOrder(n, 6, small=1)(0, 20), order(0, 20))
        first = order(0, 1000)  # neither the identity nor a shift: neighbouring positions land far apart
        assert np.abs(np.diff(first)).mean() > n / 10


def test_large_datasets_use_the_keyed_permutation():
    n = SMALL_DATASET + 1
    np.testing.assert_array_equal(SampleOrder(n, 5)(n - 3, 6), SampleOrder(n, 5, small=1)(n - 3, 6))
    assert not np.array_equal(SampleOrder(n, 5)(0, 6), reference_order(n, 5, 0, 6))


def test_per_step_work_does_not_depend_on_the_number_of_samples():
    """Counting the permutation elements computed for 200 steps of 32, at 2M and at 40M / 4e9 samples."""
    work = {}
    for n in (2 * SMALL_DATASET, 40_000_000, 4_000_000_000):
        order = SampleOrder(n, 42)
        for step in range(200):
            order(1000 + 32 * step, 32)
        work[n] = order.evaluations
    # Cycle walking costs < 4 evaluations per sample on average; nothing is proportional to n.
    assert all(200 * 32 <= w <= 4 * 200 * 32 for w in work.values()), work
    # The small-dataset path computes each epoch's permutation once, not once per step.
    order = SampleOrder(1000, 42)
    for step in range(200):  # 6.4 epochs
        order(32 * step, 32)
    assert order.evaluations == 7 * 1000


# --- local docpairs -----------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCE_JAX_CACHE_DIR", str(tmp_path / "cache"))


class CharTokenizer:
    """One token per character (ids 1000+), with the QueryDocTokenizer layout."""

    def encode_queries(self, queries):
        return [[1000 + ord(c) for c in q][:4] + [102, 102] for q in queries]

    def encode_docs(self, query_tokens, docs):
        return [[1000 + ord(c) for c in d][: 16 - 3 - len(q)] + [102, 102] for q, d in zip(query_tokens, docs)]


def pair_files(tmp_path, *, numeric: bool, scores: bool = True, gz: bool = False):
    """12 pairs over 5 queries and 9 passages, as TSV pairs + queries + docs, and the same samples as JSONL."""
    rng = np.random.default_rng(0)
    qid = (lambda i: str(100 + i)) if numeric else (lambda i: f"q-{i}")
    pid = (lambda i: str(7 + 3 * i)) if numeric else (lambda i: f"doc_{i}é")
    queries = {qid(i): f"query {i} about topic {i * 7}" for i in range(5)}
    docs = {pid(i): f"passage {i} " + "word " * (i + 1) for i in range(9)}
    pairs = [(qid(int(rng.integers(5))), pid(int(rng.integers(9))), pid(int(rng.integers(9))),
              round(float(rng.normal()), 3), round(float(rng.normal()), 3)) for _ in range(12)]
    lines = ["\t".join(map(str, p if scores else p[:3])) for p in pairs]
    name = "pairs.tsv.gz" if gz else "pairs.tsv"
    data = ("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n").encode()  # a blank line is skipped
    (tmp_path / name).write_bytes(gzip.compress(data) if gz else data)
    (tmp_path / "queries.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in queries.items()))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"docno": k, "text": v}) + "\n" for k, v in docs.items()))
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(
        {"query": queries[q], "docs": [docs[a], docs[b]], "labels": [sa, sb] if scores else [1.0, 0.0]}) + "\n"
        for q, a, b, sa, sb in pairs))
    return tmp_path / name, tmp_path / "queries.tsv", tmp_path / "docs.jsonl", tmp_path / "samples.jsonl"


@pytest.mark.parametrize("numeric, scores, gz", [(True, True, False), (False, True, True), (False, False, False)])
def test_local_docpairs_equal_the_same_pairs_as_jsonl(tmp_path, numeric, scores, gz):
    pairs, queries, docs, jsonl = pair_files(tmp_path, numeric=numeric, scores=scores, gz=gz)
    from_pairs = load_samples(str(pairs), queries=str(queries), docs=str(docs))
    from_jsonl = load_samples(str(jsonl))
    assert isinstance(from_pairs, DocPairSamples) and isinstance(from_jsonl, JsonlSamples)
    assert len(from_pairs) == len(from_jsonl) == 12 and from_pairs.num_docs == from_jsonl.num_docs == 2
    as32 = lambda s: (s.query, s.docs, np.float32(s.labels).tolist())  # noqa: E731 -- pair scores are float32
    assert [as32(from_pairs[i]) for i in range(12)] == [as32(from_jsonl[i]) for i in range(12)]
    # Numeric ids are kept as their numbers (no table); others interned into a table of distinct ids.
    assert (from_pairs.pairs.doc_ids.table is None) == numeric
    kwargs = dict(batch_size=4, grad_accum=2, max_query_length=8, max_length=16, seed=1)
    for position in (0, 10, 25):  # across epochs
        a = BatchStream(from_pairs, CharTokenizer(), **kwargs).batch_at(position)
        b = BatchStream(from_jsonl, CharTokenizer(), **kwargs).batch_at(position)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_docpair_texts_are_read_per_batch(tmp_path):
    pairs, queries, docs, _ = pair_files(tmp_path, numeric=True)
    samples = load_samples(str(pairs), queries=str(queries), docs=str(docs))
    read_before = samples.docs.texts_read
    samples.get_many([3, 4])
    assert samples.docs.texts_read - read_before <= 4  # two pairs: at most four passages read from disk


@pytest.mark.parametrize(
    "content, message",
    [
        (b"1\t2\t3\n4\t5\n", "pairs.tsv: line 2: expected 3 tab-separated fields (qid doc_a doc_b), got 2"),
        (b"1\t2\t3\t0.5\t1\n4\t5\t6\n", "pairs.tsv: line 2: expected 5 tab-separated fields"),
        (b"1\t2\t3\t0.5\t1\n\n4\t5\t6\t1\tx\n", "pairs.tsv: line 3: score_b must be a finite number, got 'x'"),
        (b"1\t2\t3\t0.5\t1\n4\t5\t6\tinf\t1\n", "pairs.tsv: line 2: score_a must be a finite number"),
        (b"1\t2\t3\n4\t\t6\n", "pairs.tsv: line 2: empty doc_a field"),
        (b"1\t2\t3\n4\t5\xff\t6\n", "pairs.tsv: line 2: not valid UTF-8"),
        (b"\n\n", "pairs.tsv: contains no pairs"),
    ],
)
def test_bad_pair_lines_name_file_and_line(tmp_path, content, message):
    (tmp_path / "pairs.tsv").write_bytes(content)
    with pytest.raises(InputError, match=re.escape(message)):
        read_docpairs(tmp_path / "pairs.tsv", chunk_bytes=8)  # tiny chunks: line numbers carry across


def test_pair_reader_interns_ids_across_chunks(tmp_path):
    lines = [f"q{i % 7}\tp{i % 11}\tp{(i * 5) % 13}\n" for i in range(200)]
    (tmp_path / "pairs.tsv").write_text("".join(lines))
    for chunk_bytes in (16, 1 << 20):
        pairs = read_docpairs(tmp_path / "pairs.tsv", chunk_bytes=chunk_bytes)
        assert pairs.scores_Px2 is None and len(pairs.query_ids) == 7 and len(pairs.doc_ids) == 13
        got = ["\t".join(x) + "\n" for x in zip(pairs.query_ids.strings(pairs.query_P),
                                               pairs.doc_ids.strings(pairs.doc_a_P),
                                               pairs.doc_ids.strings(pairs.doc_b_P))]
        assert got == lines


def test_ids_without_text_fail_up_front(tmp_path):
    pairs, queries, docs, _ = pair_files(tmp_path, numeric=True)
    first_doc = json.loads(docs.read_text().splitlines()[0])["docno"]
    docs.write_text("".join(line + "\n" for line in docs.read_text().splitlines()[1:]))
    with pytest.raises(InputError, match=rf"pairs.tsv: 1 ids have no text in --docs .*docs.jsonl \({first_doc}\)"):
        load_samples(str(pairs), queries=str(queries), docs=str(docs))
    with pytest.raises(InputError, match="needs --queries and --docs"):
        load_samples(str(pairs), docs=str(docs))


# --- JSONL index ----------------------------------------------------------------------------------------------------


def test_jsonl_index_is_built_once_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    records = [{"query": f"q{i}", "docs": ["a", "b"][: 1 + i % 2], "labels": [i, 0][: 1 + i % 2]} for i in range(9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    builds = []
    original = JsonlSamples._build_index
    monkeypatch.setattr(JsonlSamples, "_build_index", lambda self, *a: builds.append(1) or original(self, *a))
    first = JsonlSamples(path)
    second = JsonlSamples(path)
    assert len(builds) == 1 and len(second) == 9 and second.num_docs == 2
    assert tuple(second[8]) == ("q8", ["a"], [8.0])
    with open(path, "a") as f:  # size and mtime change: the index is rebuilt
        f.write(json.dumps({"query": "new", "docs": ["x", "y", "z"], "labels": [1, 2, 3]}) + "\n")
    third = JsonlSamples(path)
    assert len(builds) == 2 and len(third) == 10 and third.num_docs == 3
    assert len(first) == 9


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"query": "q\xff", "docs": ["a"], "labels": [1]}', "line 3: not valid UTF-8"),
        (b'{"query": "q", "docs": ["a \\ud83d b"], "labels": [1]}', "line 3: text is not valid Unicode"),
        (b'{"query": "q", "docs": ["a"], "labels": [true]}', "line 3: labels must be a list of finite numbers"),
    ],
)
def test_jsonl_bad_bytes_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    good = b'{"query": "q \\ud83d\\ude00", "docs": ["a"], "labels": [1]}\n'  # a valid surrogate pair
    path.write_bytes(good + b"\n" + line + b"\n")
    with pytest.raises(InputError, match=re.escape(f"t.jsonl: {message}")):
        JsonlSamples(path, chunk_bytes=16)
    assert JsonlSamples(write_good(tmp_path / "g.jsonl", good))[0].query == "q \U0001F600"


def write_good(path, line: bytes):
    path.write_bytes(line)
    return path


def test_vectorised_number_parsing_matches_python():
    from sce_jax.pairs import _decimal, _floats

    fields = [b"0", b"-12.375", b"3.", b".5", b"-.25", b"+3", b"1e3", b"-2.5E-2", b"10.363948822021484",
              b"123456789012345678", b"inf", b"x", b"1.2.3", b"-", b"007"]
    buf = np.frombuffer(b"\t".join(fields), np.uint8)
    lengths = np.array([len(f) for f in fields])
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    got = _floats(buf, starts, starts + lengths)
    for field, value in zip(fields, got):
        try:
            expected = float(field)
        except ValueError:
            assert np.isnan(value), field
            continue
        assert value == pytest.approx(expected, rel=1e-15) or (np.isinf(expected) and value == expected), field
    ids = [b"0", b"7", b"8841822", b"123456789012345678"]
    buf = np.frombuffer(b"\t".join(ids), np.uint8)
    lengths = np.array([len(f) for f in ids])
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    assert _decimal(buf, starts, lengths).tolist() == [int(i) for i in ids]
    for not_canonical in (b"007", b"-1", b"1a"):
        assert _decimal(np.frombuffer(not_canonical, np.uint8), np.array([0]), np.array([len(not_canonical)])) is None


@pytest.mark.parametrize("numeric", [True, False])
def test_pairs_are_cached_and_reread_when_the_file_changes(tmp_path, monkeypatch, numeric):
    from sce_jax import pairs as pairs_module

    pairs_path, *_ = pair_files(tmp_path, numeric=numeric)
    in_memory = read_docpairs(pairs_path)
    assert not isinstance(in_memory.query_P, np.memmap)
    reads = []
    original = pairs_module._read_docpairs
    monkeypatch.setattr(pairs_module, "_read_docpairs", lambda *a, **k: reads.append(1) or original(*a, **k))
    first = pairs_module.load_docpairs(pairs_path)
    second = pairs_module.load_docpairs(pairs_path)
    assert len(reads) == 1
    # The first load returns the cache's memory-mapped arrays too (nothing of the pairs stays in memory).
    assert all(isinstance(a, np.memmap) for a in first[:4] + second[:4])
    for got in (first, second):
        assert_same_pairs(got, in_memory)
    with open(pairs_path, "ab") as f:
        f.write(b"" if pairs_path.suffix == ".gz" else (b"101\t7\t10\t1\t2\n" if numeric else b"q-1\tx\ty\t1\t2\n"))
    third = pairs_module.load_docpairs(pairs_path)
    assert len(reads) == 2 and len(third) == 13


def assert_same_pairs(got, expected):
    for a, b in zip(got[:4], expected[:4]):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    for table in ("query_ids", "doc_ids"):
        a, b = getattr(got, table).table, getattr(expected, table).table
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
    assert got.query_ids.strings(got.query_P) == expected.query_ids.strings(expected.query_P)
    assert got.doc_ids.strings(got.doc_b_P) == expected.doc_ids.strings(expected.doc_b_P)


@pytest.mark.parametrize("later", ["q-7\t9\t5\t1.5\t2\n", "3\t9\td-5\t1.5\t2\n", "3\t4294967296\t5\t1.5\t2\n"])
def test_cached_pairs_whose_ids_need_a_table_after_many_decimal_lines(tmp_path, monkeypatch, later):
    # Decimal ids go into the cache files as they are read; an id further on that is not a decimal int32 (a
    # string, a number past 2^31) sends its group (queries, or both document columns) back to a table.
    from sce_jax import pairs as pairs_module

    lines = [f"{i % 13}\t{i % 17}\t{(i * 7) % 19}\t{i / 8}\t-{i % 5}\n" for i in range(300)]
    (tmp_path / "pairs.tsv").write_text("".join(lines) + later + "".join(lines[:10]))
    monkeypatch.setattr(pairs_module, "CHUNK_BYTES", 64)  # many chunks before the odd id
    expected = read_docpairs(tmp_path / "pairs.tsv", chunk_bytes=64)
    assert (expected.query_ids.table is None) == later.startswith("3"), "the line makes its own group need a table"
    assert (expected.doc_ids.table is None) == later.startswith("q")
    for _ in range(2):  # written, then reread from the cache
        got = pairs_module.load_docpairs(tmp_path / "pairs.tsv")
        assert isinstance(got.query_P, np.memmap) and len(got) == 311
        assert_same_pairs(got, expected)
    assert got.doc_ids.strings(got.doc_a_P[300:301]) == [later.split("\t")[1]]


def test_pairs_without_a_writable_cache_are_read_into_memory(tmp_path, monkeypatch):
    from sce_jax import pairs as pairs_module

    pairs_path, *_ = pair_files(tmp_path, numeric=True)
    expected = read_docpairs(pairs_path)
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("SCE_JAX_CACHE_DIR", str(tmp_path / "not-a-dir"))  # mkdir fails
    assert_same_pairs(pairs_module.load_docpairs(pairs_path), expected)
    monkeypatch.setenv("SCE_JAX_CACHE_DIR", str(tmp_path / "cache2"))

    append = pairs_module._Columns.append

    def full_disk(self, name, array):
        if self.directory is not None:
            raise pairs_module._CacheWriteError(OSError(28, "No space left on device"))
        append(self, name, array)

    monkeypatch.setattr(pairs_module._Columns, "append", full_disk)
    got = pairs_module.load_docpairs(pairs_path)
    assert not isinstance(got.query_P, np.memmap)
    assert_same_pairs(got, expected)
    assert not list((tmp_path / "cache2" / "docpairs").iterdir())  # the staging directory is removed


def test_bad_pairs_leave_no_cache_behind(tmp_path):
    from sce_jax import pairs as pairs_module

    (tmp_path / "pairs.tsv").write_bytes(b"1\t2\t3\n4\t5\n")
    with pytest.raises(InputError, match=re.escape("pairs.tsv: line 2: expected 3 tab-separated fields")):
        pairs_module.load_docpairs(tmp_path / "pairs.tsv")
    assert not list((tmp_path / "cache" / "docpairs").iterdir())


def test_join_freeing_equals_concatenate():
    from sce_jax.memory import join_freeing

    parts = [np.arange(n * 2, dtype=np.float32).reshape(n, 2) + n for n in (3, 0, 5, 1)]
    expected = np.concatenate(parts)
    np.testing.assert_array_equal(join_freeing(parts), expected)
    assert parts == []


def test_distinct_ids_dense_and_sparse():
    from sce_jax.train_data import distinct_ids

    a, b = np.array([5, 3, 5, 9], np.int32), np.array([0, 9, 2], np.int32)
    np.testing.assert_array_equal(distinct_ids([a, b]), [0, 2, 3, 5, 9])
    sparse = np.array([2**30, 7], np.int32)
    np.testing.assert_array_equal(distinct_ids([sparse, b]), [0, 2, 7, 9, 2**30])


@pytest.mark.parametrize("kind", ["decimal", "int table", "bytes table"])
def test_absent_ids_in_blocks(tmp_path, kind):
    from sce_jax.pairs import IdTable
    from sce_jax.textstore import TextStore
    from sce_jax.train_data import absent_ids

    present = [str(i) for i in range(0, 100, 3)] + ["x9", "12345678901"]
    (tmp_path / "c.tsv").write_text("".join(f"{i}\ttext {i}\n" for i in present))
    ids = [str(i) for i in range(0, 30)] + ["x9", "x10", "12345678901", "12345678902"]
    if kind == "decimal":
        ids = [i for i in ids if i.isdigit() and int(i) < 2**31]
        table, interned = IdTable(None), np.array([int(i) for i in ids], np.int32)
    elif kind == "int table":
        ids = [i for i in ids if i.isdigit()]
        table, interned = IdTable(np.array([int(i) for i in ids], np.int64)), np.arange(len(ids), dtype=np.int32)
    else:
        table, interned = IdTable(np.array([i.encode() for i in ids])), np.arange(len(ids), dtype=np.int32)
    expected = [i for i in ids if i not in present]
    with TextStore.open(tmp_path / "c.tsv") as store:
        for block in (1, 3, 1 << 20):
            assert absent_ids(store, table, interned, block=block) == expected
        assert store.texts_read == 0


# --- blank files, byte-order marks, content fingerprints ---------------------------------------------------------


@pytest.mark.parametrize("content", [b"\n\n\n", b"\r\n\r\n", b"\xef\xbb\xbf\n\n"])
def test_a_pairs_file_of_blank_lines_is_one_error_naming_it(tmp_path, content):
    from sce_jax.pairs import load_docpairs

    (tmp_path / "pairs.tsv").write_bytes(content)
    for load in (load_docpairs, read_docpairs):  # cached (columns written to files) and in memory
        with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'pairs.tsv'}: contains no pairs")):
            load(tmp_path / "pairs.tsv")


@pytest.mark.parametrize("first_qid", ["17", "q-17"])
def test_a_byte_order_mark_is_not_part_of_the_first_qid(tmp_path, first_qid):
    from sce_jax.pairs import load_docpairs

    (tmp_path / "pairs.tsv").write_bytes(b"\xef\xbb\xbf" + f"{first_qid}\t7\t8\n{first_qid}\t8\t7\n".encode())
    for load in (load_docpairs, read_docpairs):
        pairs = load(tmp_path / "pairs.tsv")
        assert pairs.query_ids.strings(pairs.query_P) == [first_qid, first_qid]
    (tmp_path / "q.tsv").write_text(f"{first_qid}\ta query\n")
    (tmp_path / "d.tsv").write_text("7\tseven\n8\teight\n")
    samples = load_samples(str(tmp_path / "pairs.tsv"), queries=str(tmp_path / "q.tsv"), docs=str(tmp_path / "d.tsv"))
    assert samples[0].query == "a query"


def _rewrite_keeping_size_and_mtime(path, content: bytes) -> None:
    import os

    stat = path.stat()
    assert len(content) == stat.st_size
    path.write_bytes(content)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_pairs_rewritten_at_the_same_size_and_mtime_are_read_again(tmp_path):
    """The cache is checked against the content fingerprint, not only size and modification time."""
    (tmp_path / "q.tsv").write_text("1\tfirst\n2\tsecond\n")
    (tmp_path / "d.tsv").write_text("7\tseven\n8\teight\n9\tnine\n")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_bytes(b"1\t7\t8\t1.5\t0.5\n2\t8\t9\t2.0\t1.0\n")
    first = load_samples(str(pairs), queries=str(tmp_path / "q.tsv"), docs=str(tmp_path / "d.tsv"))
    assert [tuple(first[i]) for i in range(2)] == [("first", ["seven", "eight"], [1.5, 0.5]),
                                                    ("second", ["eight", "nine"], [2.0, 1.0])]
    _rewrite_keeping_size_and_mtime(pairs, b"2\t9\t7\t0.5\t1.5\n1\t8\t7\t1.0\t2.0\n")
    again = load_samples(str(pairs), queries=str(tmp_path / "q.tsv"), docs=str(tmp_path / "d.tsv"))
    assert [tuple(again[i]) for i in range(2)] == [("second", ["nine", "seven"], [0.5, 1.5]),
                                                    ("first", ["eight", "seven"], [1.0, 2.0])]
    assert again.fingerprint != first.fingerprint and again.fingerprint["size"] == first.fingerprint["size"]


def test_jsonl_rewritten_at_the_same_size_and_mtime_is_indexed_again(tmp_path):
    path = tmp_path / "t.jsonl"
    long = json.dumps({"query": "q", "docs": ["a", "b"], "labels": [1, 0]}) + "\n"
    short = json.dumps({"query": "x", "docs": ["c"], "labels": [1]}) + "\n"
    path.write_text(long + short)
    first = JsonlSamples(path)
    assert [first[i].query for i in range(2)] == ["q", "x"]
    _rewrite_keeping_size_and_mtime(path, (short + long).encode())  # the offsets of the lines move
    again = JsonlSamples(path)
    assert [again[i].query for i in range(2)] == ["x", "q"] and again.fingerprint != first.fingerprint
